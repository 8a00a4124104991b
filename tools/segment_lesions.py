"""`segment_lesions`: where the diabetic-retinopathy lesions and the optic disc are.

An smp Unet gives per-pixel probabilities for microaneurysms (MA), haemorrhages (HE), hard
exudates (EX), soft exudates (SE) and the optic disc (OD); thresholds stored with the
weights turn them into masks, connected components into counts, pixel sums into areas (as
a percentage of the camera's field of view and in disc areas). With the disc found, the
fovea is located (measurements.py) and each lesion kind gets its nearest distance from the
fovea in disc diameters: hard exudates within 1 DD of the fovea mean the macula is
involved, which the triage table treats as urgent. The overlay PNG is for the person.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ophglm.session import Session
from ophglm.settings import cpu_has_native_bf16
from ophglm.tools.assess_quality import gradable_photo
from ophglm.tools.base import Artifact, ImageInput, Tool, ToolResult
from ophglm.tools.measurements import DISC_WIDTH_SHARE, MACULA_RADIUS_DD, disc_width_share, find_disc, locate_fovea, nearest_distance_dd
from ophglm.tools.vision import Photo, as_photo, flip_averaged, fov_mask, load_weights, tiled_forward, to_tensor, weights_path

SEGMENTER_FILE = "fundus_lesions.safetensors"
LESION_NAMES = {"MA": "microaneurysms", "HE": "haemorrhages", "EX": "hard exudates", "SE": "soft exudates (cotton-wool spots)"}
OVERLAY_COLOURS = {"MA": (255, 255, 255), "HE": (255, 0, 0), "EX": (0, 120, 255), "SE": (0, 255, 0), "OD": (255, 255, 0)}
MIN_COMPONENT_PIXELS_AT_512 = 3  # on a 512 px square (4x that at 1024): smaller specks are noise, not a countable lesion
LESION_MASKS = "lesion_masks"  # the session memo of `masks_batch`, by photograph
MAX_TILE = 1024  # px: a larger fundus square (a model trained at 2048 on a GPU) is segmented in overlapping tiles
# Flip views averaged (vision.flip_averaged): 4 raised every class's AUPR on the held-out IDRiD
# photographs at 4x the forward time, 8 gained at most 0.008 more (fundus_lesions.md). Settings.lesion_views
# changes it; its default must stay this one.
LESION_VIEWS = 4


class Masks(NamedTuple):
    """What the Unet found on one photograph's fundus square, speck-free."""

    square: Image.Image
    masks: dict[str, np.ndarray]  # by class code
    field: np.ndarray  # the camera's field of view
    counts: dict[str, int]  # connected lesions by class code


def overlay_png(image: Image.Image, masks: dict[str, np.ndarray]) -> bytes:
    """The photograph with each class tinted in its colour (IDRiD's own colour convention)."""
    canvas = np.asarray(image, dtype=np.float32).copy()
    for name, mask in masks.items():
        colour = np.array(OVERLAY_COLOURS[name], dtype=np.float32)
        if name == "OD":  # outline the disc so the structure under it stays visible
            mask = mask & ~ndimage.binary_erosion(mask, iterations=2)
        canvas[mask] = 0.35 * canvas[mask] + 0.65 * colour
    buffer = io.BytesIO()
    Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)  # 4x faster to write than the default, 15% larger
    return buffer.getvalue()


def without_specks(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The mask without components too small to be a lesion, and how many components remain.

    Sizes are counted over the foreground pixels only (a few thousand), not the whole
    square: 3x faster at 512 px, and the count saves labelling the mask again.
    """
    labelled, count = ndimage.label(mask)
    if not count:
        return mask, 0
    where = np.flatnonzero(mask)
    ids = labelled.ravel()[where]
    sizes = np.bincount(ids, minlength=count + 1)
    speck = sizes[ids] < MIN_COMPONENT_PIXELS_AT_512 * mask.size / 512**2
    if not speck.any():
        return mask, count
    cleaned = mask.copy()
    cleaned.ravel()[where[speck]] = False
    return cleaned, len(np.unique(ids[~speck]))


class SegmentLesions(Tool):
    name = "segment_lesions"
    description = (
        "Find diabetic-retinopathy lesions and the optic disc in one colour fundus photograph of this "
        "session: counts and areas (% of the field of view) of microaneurysms, haemorrhages, hard "
        "exudates and soft exudates (cotton-wool spots), and the optic disc's position. Also makes an overlay picture."
    )
    inputs = ImageInput

    def __init__(self, weights_dir: str = "", device: str = "cpu", views: int = LESION_VIEWS):
        super().__init__()
        self.weights_dir, self.device, self.views = weights_dir, device, views

    def setup(self) -> None:
        self.model, self.config = load_weights(weights_path(SEGMENTER_FILE, self.weights_dir), self.device)

    @torch.inference_mode()
    def probabilities(self, squares: list[Image.Image]) -> np.ndarray:
        """Batched path: (N, classes, size, size) probabilities for fundus squares, averaged over the flip views."""
        size = self.config["image_size"]
        batch = torch.stack([to_tensor(im, size) for im in squares]).to(self.device)
        with self.autocast():
            return flip_averaged(self.forward, batch, self.views).cpu().numpy()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Probabilities of one view of a normalised batch (tiled above MAX_TILE px)."""
        return tiled_forward(self.model, batch, MAX_TILE, MAX_TILE // 8).sigmoid()

    def autocast(self) -> torch.autocast:
        """bf16 where the hardware computes it natively, as training validated and chose thresholds: 1.5x faster at 1024 px."""
        native = self.device.startswith("cuda") or cpu_has_native_bf16()
        return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=native)

    def masks_batch(self, images: list[Image.Image | Photo]) -> list[Masks]:
        """(fundus square, class masks, field of view, lesion counts) for each photograph (a PIL image or a session's Photo), from one Unet forward."""
        size = self.config["image_size"]
        squares = [as_photo(image).square(size) for image in images]
        found = []
        for square, probs in zip(squares, self.probabilities(squares)):
            field = fov_mask(square)
            masks = {c: (probs[k] > self.config["thresholds"][c]) & field for k, c in enumerate(self.config["classes"])}
            counts = {}
            for code in LESION_NAMES:  # specks are noise: counts, areas and distances all ignore them
                masks[code], counts[code] = without_specks(masks[code])
            found.append(Masks(square, masks, field, counts))
        return found

    def session_masks_batch(self, photos: list[tuple[Session, str]], caller: str) -> list[Masks]:
        """`masks_batch` of session photographs, computed once per photograph (measure_optic_disc starts from them too).

        The photographs not yet memoised in their session go through one forward together.
        Every photograph passes the quality gate first, so a rejected one raises its
        ToolError before any network work (the tool server then reruns the calls one by one).
        """
        gradable = [gradable_photo(session, image_id, caller) for session, image_id in photos]
        pending = {}  # the same photograph twice in a batch is segmented once
        for (session, image_id), photo in zip(photos, gradable):
            if (LESION_MASKS, image_id) not in session.derived:
                pending[(id(session), image_id)] = photo
        computed: dict = {}

        def all_pending() -> dict:  # the first photograph to need its masks computes every pending one
            if not computed:
                computed.update(zip(pending, self.masks_batch(list(pending.values()))))
            return computed

        def compute(session: Session, image_id: str, photo):
            key = (id(session), image_id)
            return all_pending()[key] if key in pending else self.masks_batch([photo])[0]  # (a memo cleared meanwhile)

        return [session.derive(LESION_MASKS, image_id, lambda s=session, i=image_id, p=photo: compute(s, i, p))
                for (session, image_id), photo in zip(photos, gradable)]

    def run(self, inputs: ImageInput, session: Session) -> ToolResult:
        return self.run_batch([(inputs, session)])[0]

    def run_batch(self, calls: list[tuple[ImageInput, Session]]) -> list[ToolResult]:
        """One Unet forward for the batch's photographs, then each is measured on its own."""
        found = self.session_masks_batch([(session, inputs.image_id) for inputs, session in calls], self.name)
        return [self._result(inputs.image_id, *masks) for (inputs, _), masks in zip(calls, found)]

    def _result(self, image_id: str, square: Image.Image, masks: dict[str, np.ndarray], field: np.ndarray, counts: dict[str, int]) -> ToolResult:
        field_pixels = max(int(field.sum()), 1)
        side = square.width
        disc = find_disc(masks["OD"])
        share = disc_width_share(disc, field) if disc else None
        if share is not None and not DISC_WIDTH_SHARE[0] <= share <= DISC_WIDTH_SHARE[1]:
            disc = None  # a fragment of the disc, or not the disc: sizes and distances in its diameters would mislead
        fovea = locate_fovea(square, disc, field) if disc else None
        lesions, parts = {}, []
        for code, name in LESION_NAMES.items():
            count = counts[code]
            area = 100.0 * float(masks[code].sum()) / field_pixels
            finding = {"name": name, "count": {"value": count, "unit": "lesions"}, "area": {"value": round(area, 3), "unit": "% of field of view"}}
            part = f"{name}: {count} ({area:.2f}% of field"
            if disc:
                finding["area_disc_areas"] = {"value": round(float(masks[code].sum()) / disc.area, 3), "unit": "disc areas"}
            if fovea and count:
                distance = nearest_distance_dd(masks[code], fovea, disc.diameter)
                finding["nearest_to_fovea"] = {"value": round(distance, 2), "unit": "disc diameters"}
                part += f", nearest {distance:.2f} disc diameters from the fovea"
            lesions[code] = finding
            parts.append(part + ")")
        findings = {"image_id": image_id, "lesions": lesions}
        if disc:
            findings["optic_disc"] = {"detected": True, "center": {"x": round(disc.x / side, 3), "y": round(disc.y / side, 3), "unit": "fraction of image width"},
                                      "area": {"value": round(100.0 * disc.area / field_pixels, 3), "unit": "% of field of view"},
                                      "diameter": {"value": round(disc.diameter / side, 4), "unit": "fraction of image width"}}
            parts.append("optic disc found")
        elif share is not None:
            findings["optic_disc"] = {"detected": False, "rejected_size": {"value": round(share, 3), "unit": "fraction of the field of view's width"}}
            parts.append(f"optic disc not found reliably (the disc-like region is {share:.2f} of the field's width; a disc is "
                         f"{DISC_WIDTH_SHARE[0]:.2f}-{DISC_WIDTH_SHARE[1]:.2f}), so the fovea and distances were not measured")
        else:
            findings["optic_disc"] = {"detected": False}
            parts.append("optic disc not found, so the fovea and distances were not measured")
        if fovea:
            findings["fovea"] = {"detected": True, "center": {"x": round(fovea[0] / side, 3), "y": round(fovea[1] / side, 3), "unit": "fraction of image width"}}
            exudate = lesions["EX"].get("nearest_to_fovea", {}).get("value")
            involved = exudate is not None and exudate <= MACULA_RADIUS_DD
            findings["macular_exudates"] = {"value": involved, "unit": f"hard exudates within {MACULA_RADIUS_DD:g} disc diameter of the fovea"}
            parts.append("hard exudates within 1 disc diameter of the fovea (macula involved)" if involved else "no hard exudates within 1 disc diameter of the fovea")
        overlay_id = f"overlay-{image_id}"
        findings["overlay"] = overlay_id
        summary = f"Lesions in {image_id}: " + "; ".join(parts) + f". Overlay saved as {overlay_id}."
        return ToolResult(summary=summary, findings=findings, artifacts={overlay_id: Artifact(lambda: overlay_png(square, masks))})
