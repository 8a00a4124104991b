"""`assess_quality`: is this a colour fundus photograph, and can it be graded?

A gate, not a diagnosis: it runs before any other vision tool looks at a photograph, and a
rejected image gets a reason and no disease probability, lesion count or measurement from
any tool (`gradable_image` below is how every vision tool fetches its pixels). It is a
handful of measured image properties with thresholds, not a network, so every rejection
can say exactly which property failed and by how much:

- a fundus photograph is a round, red-orange camera aperture on a black frame: dark
  corners, a field that fills its own circle, red above green above blue, colour at all
  (red-free, OCT scans, documents and screenshots are grey or white);
- it is gradable when the field is big enough, neither too dark nor washed out, and has
  detail (vessel edges) rather than blur.

The thresholds sit below what the real fundus photographs in ../shared/data measure (the
benchmark `ophglm eval vision` prints both rejection rates) and above what photographs,
documents, noise and greyscale scans measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from ophglm.session import Session
from ophglm.tools.base import ImageInput, Tool, ToolError, ToolResult
from ophglm.tools.vision import FOV_THRESHOLD, Photo, as_photo

WHITE_PADDING = 235  # min(R,G,B) above this is white padding, not retina
ANALYSIS_SIDE = 512  # measured on a copy at most this size: cheap, and focus becomes scale-free

# (measure, lowest accepted, highest accepted, reason when outside) — a fundus photograph
# must pass all of these; the first failure is the reason given.
FUNDUS_RULES = (
    ("peak_brightness", 35.0, 255.0, "the image is almost black: too dark to grade or even to tell what it shows"),
    ("dark_corners", 0.50, 1.0, "no dark frame around a round field of view, as a fundus camera gives"),
    ("aperture_roundness", 0.75, 1.0, "the lit area is not the round aperture of a fundus camera"),
    ("colourfulness", 0.12, 1.0, "the image is (nearly) greyscale: not a colour fundus photograph (red-free, OCT or a document?)"),
    ("red_over_green", 0.98, 99.0, "the colours are not those of a retina (red-orange, red above green)"),
    ("green_over_blue", 0.90, 99.0, "the colours are not those of a retina (blue dominates)"),
    ("warm_fraction", 0.50, 1.0, "too much of the image is colours a retina does not have (red >= green >= blue)"),
    ("detail", 0.0, 0.25, "the texture is grainy like noise, not a retina"),
)
GRADABLE_RULES = (
    ("field_fraction", 0.20, 1.0, "the field of view covers too little of the image to grade"),
    ("brightness", 25.0, 250.0, "the exposure is unusable (too dark or washed out)"),
    ("overexposed_fraction", 0.0, 0.60, "large parts of the field are overexposed"),
    ("detail", 0.0015, 99.0, "the photograph is too blurred to see vessel edges"),
)
UNITS = {
    "peak_brightness": "99th percentile of 0-255", "dark_corners": "fraction of corner pixels", "aperture_roundness": "IoU with the aperture circle",
    "colourfulness": "mean chroma (0-1)", "red_over_green": "ratio", "green_over_blue": "ratio",
    "field_fraction": "fraction of the image", "brightness": "mean of 0-255", "overexposed_fraction": "fraction of the field",
    "detail": "fine-scale contrast relative to brightness", "warm_fraction": "fraction of the field",
}


@dataclass
class Quality:
    is_fundus: bool
    gradable: bool
    reasons: list[str] = field(default_factory=list)
    measures: dict[str, float] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.is_fundus and self.gradable

    def verdict(self) -> str:
        if self.usable:
            return "a gradable colour fundus photograph"
        return ("not a colour fundus photograph" if not self.is_fundus else "an ungradable fundus photograph") + f": {self.reasons[0]}"


def _roundness(mask: np.ndarray) -> float:
    """IoU between the lit area and the ellipse fitted to its edge, clipped by the frame.

    Fundus apertures are circles, often clipped by the frame (at the top and bottom in
    IDRiD, on all four sides in tight crops) and stretched into ellipses when a photograph
    was resized to a square; so an axis-aligned ellipse is fitted (least squares,
    algebraic) only to the lit area's edge pixels away from the frame.
    """
    if mask.sum() < 0.02 * mask.size:
        return 0.0
    edge = mask & ~ndimage.binary_erosion(mask)
    edge[:3], edge[-3:], edge[:, :3], edge[:, -3:] = False, False, False, False
    ys, xs = (v.astype(np.float64) for v in np.nonzero(edge))
    if len(xs) < 20:
        return 0.0
    # x^2 + b y^2 + d x + e y + f = 0
    (b, d, e, f), *_ = np.linalg.lstsq(np.column_stack([ys**2, xs, ys, np.ones_like(xs)]), -(xs**2), rcond=None)
    if b <= 0:
        return 0.0
    cx, cy = -d / 2, -e / (2 * b)
    rx_sq = cx**2 + b * cy**2 - f
    if rx_sq <= 0:
        return 0.0
    yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1]]
    ellipse = (xx - cx) ** 2 + b * (yy - cy) ** 2 <= rx_sq
    return float((mask & ellipse).sum() / max((mask | ellipse).sum(), 1))


def measure(image: Image.Image) -> dict[str, float]:
    small = image.convert("RGB")
    small.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE))
    rgb = np.asarray(small.filter(ImageFilter.BoxBlur(1)), dtype=np.float32)
    # The frame around the aperture is black, or white where a photograph was padded.
    # Holes are filled: a saturated optic disc or glare inside the field is still field.
    lit = ndimage.binary_fill_holes((rgb.max(axis=2) > FOV_THRESHOLD) & (rgb.min(axis=2) < WHITE_PADDING))
    h, w = lit.shape
    c = max(2, int(0.06 * min(h, w)))
    corners = np.concatenate([lit[:c, :c].ravel(), lit[:c, -c:].ravel(), lit[-c:, :c].ravel(), lit[-c:, -c:].ravel()])
    inside = lit if lit.sum() >= 0.02 * lit.size else np.ones_like(lit)
    pixels = rgb[inside]
    r, g, b = (float(np.median(pixels[:, k])) + 1.0 for k in range(3))
    top = pixels.max(axis=1)
    chroma = (top - pixels.min(axis=1)) / np.maximum(top, 1.0)
    # Detail: fine-scale structure (vessel edges, nerve-fibre texture) of the green channel,
    # where vessels show best: the mean absolute difference from a blurred copy inside the
    # eroded field, relative to brightness, so exposure or the aperture edge cannot pass for it.
    green_image = small.getchannel("G")
    green = np.asarray(green_image, dtype=np.float32)
    fine = np.abs(green - np.asarray(green_image.filter(ImageFilter.GaussianBlur(3)), dtype=np.float32))
    core = ndimage.binary_erosion(inside, iterations=8)
    core = core if core.any() else inside
    return {
        "peak_brightness": float(np.percentile(rgb.max(axis=2), 99)),
        "dark_corners": float(1.0 - corners.mean()),
        "aperture_roundness": _roundness(lit),
        "colourfulness": float(chroma.mean()),
        "red_over_green": r / g,
        "green_over_blue": g / b,
        "field_fraction": float(lit.mean()),
        "brightness": float(top.mean()),
        "overexposed_fraction": float((pixels.min(axis=1) >= 240).mean()),
        # Retinal colours order red >= green >= blue (small slack for JPEG and camera tint).
        "warm_fraction": float(((pixels[:, 0] >= pixels[:, 1] - 4) & (pixels[:, 1] >= 0.8 * pixels[:, 2] - 4)).mean()),
        "detail": float(fine[core].mean() / max(float(green[core].mean()), 1.0)),
    }


def _failures(measures: dict[str, float], rules) -> list[str]:
    return [f"{reason} ({name} {measures[name]:.3g}, accepted {lo:g}-{hi:g})" for name, lo, hi, reason in rules if not lo <= measures[name] <= hi]


def assess(image: Image.Image) -> Quality:
    measures = measure(image)
    not_fundus = _failures(measures, FUNDUS_RULES)
    if not_fundus:
        return Quality(False, False, not_fundus, measures)
    ungradable = _failures(measures, GRADABLE_RULES)
    return Quality(True, not ungradable, ungradable, measures)


def session_quality(session: Session, image_id: str) -> Quality:
    """The gate's verdict on one session image, measured once."""
    return session.derive("quality", image_id, lambda: assess(session.image(image_id)))


def gradable_photo(session: Session, image_id: str, tool_name: str) -> Photo:
    """`gradable_image` as a Photo (its aperture box and pixel array), made once per photograph: every vision tool starts from it."""
    image = gradable_image(session, image_id, tool_name)
    return session.derive("photo", image_id, lambda: as_photo(image))


def gradable_image(session: Session, image_id: str, tool_name: str) -> Image.Image:
    """A vision tool's only way to its pixels: refuses images the gate rejects."""
    quality = session_quality(session, image_id)
    if not quality.usable:
        raise ToolError(f"{tool_name} did not analyse {image_id}: it is {quality.verdict()}")
    return session.image(image_id)


class AssessQuality(Tool):
    name = "assess_quality"
    description = (
        "Check that one image of this session is a gradable colour fundus photograph (not another kind of "
        "picture, greyscale scan or document; not too dark, washed out or blurred) before anything is read from it."
    )
    inputs = ImageInput

    def run(self, inputs: ImageInput, session: Session) -> ToolResult:
        quality = session_quality(session, inputs.image_id)
        findings = {
            "image_id": inputs.image_id, "is_fundus": quality.is_fundus, "gradable": quality.gradable,
            "verdict": quality.verdict(), "reasons": quality.reasons,
            "measures": {k: {"value": round(v, 3), "unit": UNITS[k]} for k, v in quality.measures.items()},
        }
        summary = f"Image {inputs.image_id} is {quality.verdict()}."
        if not quality.usable:
            summary += " No disease or lesion findings can be given for it; ask for a clear colour fundus photograph."
        return ToolResult(summary=summary, findings=findings)
