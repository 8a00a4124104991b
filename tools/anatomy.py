"""`measure_optic_disc` (vertical cup-to-disc ratio) and `measure_vessels` (vessel density).

The disc/cup Unet was trained on Drishti-GS crops that frame the disc tightly, so it must
see the same framing: the lesion segmenter finds the disc on the whole photograph, and a
square crop `crop_to_disc_diameter` disc diameters wide is cut around it from the
full-resolution photograph (stored with the weights, measured on the training masks). The
vessel Unet (DRIVE) looks at the whole fundus square like the lesion segmenter does.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ophglm.session import Session
from ophglm.tools.assess_quality import gradable_image
from ophglm.tools.base import ImageInput, Tool, ToolError, ToolResult
from ophglm.tools.measurements import find_disc, vertical_cdr
from ophglm.tools.segment_lesions import SegmentLesions
from ophglm.tools.vision import fov_mask, fundus_square, load_weights, to_tensor, weights_path

DISC_CUP_FILE = "fundus_disc_cup.safetensors"
VESSEL_FILE = "fundus_vessels.safetensors"
MIN_DISC_PIXELS = 60  # a disc narrower than this in the source photograph is too coarse for a reliable ratio
CDR_REFERRAL = 0.7  # vertical CDR at or above this is a common glaucoma-suspect referral criterion


class _Unet:
    """A segmentation weights file with its config: probabilities for a batch of squares."""

    def __init__(self, filename: str, weights_dir: str, device: str):
        self.model, self.config = load_weights(weights_path(filename, weights_dir), device)
        self.device = device

    @torch.inference_mode()
    def probabilities(self, squares: list[Image.Image]) -> np.ndarray:
        """Batched path: (N, classes, size, size)."""
        size = self.config["image_size"]
        batch = torch.stack([to_tensor(im, size) for im in squares]).to(self.device)
        return self.model(batch).float().sigmoid().cpu().numpy()

    def masks(self, squares: list[Image.Image]) -> list[dict[str, np.ndarray]]:
        return [{c: p[k] > self.config["thresholds"][c] for k, c in enumerate(self.config["classes"])} for p in self.probabilities(squares)]


class MeasureOpticDisc(Tool):
    name = "measure_optic_disc"
    description = (
        "Measure the optic disc and cup in one colour fundus photograph of this session: the vertical "
        "cup-to-disc ratio (CDR), used when judging glaucoma risk. Use it for questions about the optic "
        "nerve, the cup, or glaucoma."
    )
    inputs = ImageInput

    def __init__(self, weights_dir: str = "", device: str = "cpu"):
        super().__init__()
        self.weights_dir, self.device = weights_dir, device
        self.locator = SegmentLesions(weights_dir, device)

    def setup(self) -> None:
        self.locator.setup()
        self.unet = _Unet(DISC_CUP_FILE, self.weights_dir, self.device)

    def _crop(self, full: Image.Image, x: float, y: float, diameter: float) -> Image.Image:
        half = self.unet.config["crop_to_disc_diameter"] * diameter / 2
        return full.crop((round(x - half), round(y - half), round(x + half), round(y + half)))

    def disc_masks(self, image: Image.Image, lesion_disc: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """Disc and cup masks on a full-resolution crop framed like the training crops.

        The lesion segmenter's disc mask (`lesion_disc`, on the 512 px fundus square) places
        the first crop; the disc/cup Unet's own, sharper disc then re-centres and re-scales
        it, up to twice, because a disc misjudged in size at 512 px (small photographs)
        would be framed wrongly.
        """
        disc = find_disc(lesion_disc)
        if disc is None:
            raise ToolError(f"{self.name}: the optic disc was not found in this photograph, so no cup-to-disc ratio can be measured")
        full = fundus_square(image)
        scale = full.width / lesion_disc.shape[1]
        x, y, diameter = disc.x * scale, disc.y * scale, disc.diameter * scale
        for attempt in range(3):
            crop = self._crop(full, x, y, diameter)
            found = self.unet.masks([crop])[0]
            refined = find_disc(found["disc"])
            if refined is None or attempt == 2:
                break
            size = found["disc"].shape[0]
            to_full = crop.width / size
            expected = size / self.unet.config["crop_to_disc_diameter"]
            off_centre = np.hypot(refined.x - size / 2, refined.y - size / 2) / expected
            if abs(refined.diameter / expected - 1) < 0.1 and off_centre < 0.1:
                break
            x, y = x - crop.width / 2 + refined.x * to_full, y - crop.height / 2 + refined.y * to_full
            diameter = refined.diameter * to_full
        return found, diameter

    def run(self, inputs: ImageInput, session: Session) -> ToolResult:
        _, lesion_masks, _ = self.locator.session_masks(session, inputs.image_id, self.name)  # segment_lesions' own, when it ran
        masks, diameter = self.disc_masks(session.image(inputs.image_id), lesion_masks["OD"])
        cdr = vertical_cdr(masks["disc"], masks["cup"])
        if cdr is None:
            raise ToolError(f"{self.name}: the disc outline could not be traced in the crop around the disc")
        coarse = diameter < MIN_DISC_PIXELS
        findings = {
            "image_id": inputs.image_id,
            "vertical_cdr": {"value": round(cdr, 2), "unit": "ratio"},
            "cup_area_ratio": {"value": round(float(masks["cup"].sum()) / max(int(masks["disc"].sum()), 1), 2), "unit": "ratio"},
            "disc_diameter": {"value": round(diameter), "unit": "pixels in the photograph"},
            "reliable": not coarse,
        }
        summary = f"Vertical cup-to-disc ratio of {inputs.image_id}: {cdr:.2f}"
        summary += f" (at or above {CDR_REFERRAL}, a common glaucoma-suspect threshold)." if cdr >= CDR_REFERRAL else f" (below {CDR_REFERRAL})."
        if coarse:
            summary += f" The disc is only {diameter:.0f} pixels wide in this photograph, so the ratio is unreliable."
        return ToolResult(summary=summary, findings=findings)


class MeasureVessels(Tool):
    name = "measure_vessels"
    description = (
        "Measure the retinal blood vessels in one colour fundus photograph of this session: vessel density "
        "as a percentage of the field of view. Use it for questions about the blood vessels."
    )
    inputs = ImageInput

    def __init__(self, weights_dir: str = "", device: str = "cpu"):
        super().__init__()
        self.weights_dir, self.device = weights_dir, device

    def setup(self) -> None:
        self.unet = _Unet(VESSEL_FILE, self.weights_dir, self.device)

    def vessel_mask(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        size = self.unet.config["image_size"]
        square = fundus_square(image, size)
        field = fov_mask(square)
        return self.unet.masks([square])[0]["vessel"] & field, field

    def run(self, inputs: ImageInput, session: Session) -> ToolResult:
        vessels, field = self.vessel_mask(gradable_image(session, inputs.image_id, self.name))
        density = 100.0 * float(vessels.sum()) / max(int(field.sum()), 1)
        findings = {"image_id": inputs.image_id, "vessel_density": {"value": round(density, 2), "unit": "% of field of view"}}
        return ToolResult(summary=f"Retinal vessel density of {inputs.image_id}: {density:.2f}% of the field of view.", findings=findings)
