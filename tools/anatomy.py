"""`measure_optic_disc` (vertical cup-to-disc ratio) and `measure_vessels` (vessel density).

The disc/cup Unet was trained on Drishti-GS crops that frame the disc tightly, so it must
see the same framing: the lesion segmenter finds the disc on the whole photograph, and a
square crop `crop_to_disc_diameter` disc diameters wide is cut around it from the
full-resolution photograph (stored with the weights, measured on the training masks). The
vessel Unet (DRIVE) looks at the whole fundus square like the lesion segmenter does.
Both tools take a tool-server batch through their Unets together (`run_batch`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ophglm.session import Session
from ophglm.tools.assess_quality import gradable_photo
from ophglm.tools.base import ImageInput, Tool, ToolError, ToolResult
from ophglm.tools.measurements import find_disc, vertical_cdr
from ophglm.tools.segment_lesions import SegmentLesions
from ophglm.tools.vision import Photo, as_photo, fov_mask, fundus_square, load_weights, to_tensor, weights_path

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

    def disc_masks_batch(self, images: list[Image.Image | Photo], lesion_discs: list[np.ndarray]) -> list[tuple[dict[str, np.ndarray], float]]:
        """Disc and cup masks, with the disc diameter, on full-resolution crops framed like the training crops.

        The lesion segmenter's disc mask (`lesion_disc`, on its fundus square) places
        the first crop; the disc/cup Unet's own, sharper disc then re-centres and re-scales
        it, up to twice, because a disc misjudged in size there (small photographs)
        would be framed wrongly. Each round is one Unet forward for every photograph still
        being re-framed, so a batch costs at most three forwards whatever its size.
        """
        frames = []  # per photograph: its full-resolution fundus square and the disc's x, y, diameter on it
        for image, lesion_disc in zip(images, lesion_discs):
            disc = find_disc(lesion_disc)
            if disc is None:
                raise ToolError(f"{self.name}: the optic disc was not found in this photograph, so no cup-to-disc ratio can be measured")
            full = image.square() if isinstance(image, Photo) else fundus_square(image)  # full resolution: the box is all it needs
            scale = full.width / lesion_disc.shape[1]
            frames.append((full, disc.x * scale, disc.y * scale, disc.diameter * scale))
        measured = [None] * len(frames)  # each is set in the first round, and again in each re-framing
        active = list(range(len(frames)))
        for attempt in range(3):
            crops = [self._crop(*frames[i]) for i in active]
            reframe = []
            for i, crop, found in zip(active, crops, self.unet.masks(crops)):
                full, x, y, diameter = frames[i]
                measured[i] = (found, diameter)
                refined = find_disc(found["disc"])
                if refined is None or attempt == 2:
                    continue
                size = found["disc"].shape[0]
                to_full = crop.width / size
                expected = size / self.unet.config["crop_to_disc_diameter"]
                off_centre = np.hypot(refined.x - size / 2, refined.y - size / 2) / expected
                if abs(refined.diameter / expected - 1) < 0.1 and off_centre < 0.1:
                    continue
                frames[i] = (full, x - crop.width / 2 + refined.x * to_full, y - crop.height / 2 + refined.y * to_full, refined.diameter * to_full)
                reframe.append(i)
            active = reframe
            if not active:
                break
        return measured

    def run(self, inputs: ImageInput, session: Session) -> ToolResult:
        return self.run_batch([(inputs, session)])[0]

    def run_batch(self, calls: list[tuple[ImageInput, Session]]) -> list[ToolResult]:
        """One lesion-Unet forward for the photographs not yet segmented (segment_lesions' own masks when it ran), then the disc/cup rounds."""
        located = self.locator.session_masks_batch([(session, inputs.image_id) for inputs, session in calls], self.name)
        photos = [gradable_photo(session, inputs.image_id, self.name) for inputs, session in calls]  # the gate's verdicts are memoised by now
        measured = self.disc_masks_batch(photos, [found.masks["OD"] for found in located])
        return [self._result(inputs.image_id, masks, diameter) for (inputs, _), (masks, diameter) in zip(calls, measured)]

    def _result(self, image_id: str, masks: dict[str, np.ndarray], diameter: float) -> ToolResult:
        cdr = vertical_cdr(masks["disc"], masks["cup"])
        if cdr is None:
            raise ToolError(f"{self.name}: the disc outline could not be traced in the crop around the disc")
        coarse = diameter < MIN_DISC_PIXELS
        findings = {
            "image_id": image_id,
            "vertical_cdr": {"value": round(cdr, 2), "unit": "ratio"},
            "cup_area_ratio": {"value": round(float(masks["cup"].sum()) / max(int(masks["disc"].sum()), 1), 2), "unit": "ratio"},
            "disc_diameter": {"value": round(diameter), "unit": "pixels in the photograph"},
            "reliable": not coarse,
        }
        summary = f"Vertical cup-to-disc ratio of {image_id}: {cdr:.2f}"
        summary += f" (at or above {CDR_REFERRAL}, where an optic nerve assessment is usually advised)." if cdr >= CDR_REFERRAL else f" (below {CDR_REFERRAL})."
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

    def vessel_masks(self, images: list[Image.Image | Photo]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(vessel mask, field of view) for each photograph (a PIL image or a session's Photo), from one Unet forward."""
        size = self.unet.config["image_size"]
        squares = [as_photo(image).square(size) for image in images]
        return [(found["vessel"] & field, field) for found, field in zip(self.unet.masks(squares), map(fov_mask, squares))]

    def run(self, inputs: ImageInput, session: Session) -> ToolResult:
        return self.run_batch([(inputs, session)])[0]

    def run_batch(self, calls: list[tuple[ImageInput, Session]]) -> list[ToolResult]:
        """One Unet forward for the batch; every photograph passes the quality gate before it, so a rejected one raises first."""
        photos = [gradable_photo(session, inputs.image_id, self.name) for inputs, session in calls]
        return [self._result(inputs.image_id, *found) for (inputs, _), found in zip(calls, self.vessel_masks(photos))]

    def _result(self, image_id: str, vessels: np.ndarray, field: np.ndarray) -> ToolResult:
        density = 100.0 * float(vessels.sum()) / max(int(field.sum()), 1)
        findings = {"image_id": image_id, "vessel_density": {"value": round(density, 2), "unit": "% of field of view"}}
        return ToolResult(summary=f"Retinal vessel density of {image_id}: {density:.2f}% of the field of view.", findings=findings)
