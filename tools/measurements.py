"""Geometry on fundus masks: disc size, fovea, distances in disc diameters, cup-to-disc ratio.

Clinicians measure the fundus in disc diameters (DD) and disc areas, because photographs
have no millimetre scale; so do we. The fovea is not segmented by any model here: it is
located the way a grader does, as the darkest spot about 2.5 DD temporal to the disc
centre, level with it or a little below. These functions take masks and return plain
numbers; the tools attach the units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

FOVEA_DISTANCE_DD = (1.8, 3.2)  # search annulus around the disc centre (typical 2.5 DD)
FOVEA_VERTICAL_DD = 1.0  # the fovea lies within about 1 DD of the disc's horizontal line
MACULA_RADIUS_DD = 1.0  # "within one disc diameter of the fovea": the macular-involvement rule


@dataclass(frozen=True)
class Disc:
    x: float
    y: float
    diameter: float  # equivalent-circle diameter, pixels
    area: int  # pixels


def find_disc(mask: np.ndarray, min_pixels: int = 50) -> Disc | None:
    """The largest connected disc region (a disc mask can have specks elsewhere)."""
    labelled, count = ndimage.label(mask)
    if not count:
        return None
    where = np.flatnonzero(mask)  # sizes and centre over the foreground only: 3x faster than over the square
    ids = labelled.ravel()[where]
    sizes = np.bincount(ids, minlength=count + 1)
    biggest = int(np.argmax(sizes[1:])) + 1
    if sizes[biggest] < min_pixels:
        return None
    ys, xs = np.divmod(where[ids == biggest], mask.shape[1])
    area = len(xs)
    return Disc(float(xs.mean()), float(ys.mean()), float(2 * np.sqrt(area / np.pi)), area)


def locate_fovea(square: Image.Image, disc: Disc, field: np.ndarray) -> tuple[float, float] | None:
    """The darkest smoothed spot in the annulus 1.8-3.2 DD from the disc, on the side towards the field's centre.

    Computed on the window that can hold the annulus (plus the blur's and erosion's reach,
    so the result is the whole-image one): a third of the time.
    """
    dd, (h, w) = disc.diameter, field.shape
    columns = field.sum(axis=0)
    centre_x = float(columns @ np.arange(w) / columns.sum()) if columns.any() else w / 2
    temporal = np.sign(centre_x - disc.x) or 1.0  # the macula lies towards the middle of the photograph
    reach_x = FOVEA_DISTANCE_DD[1] * dd
    x0, x1 = (disc.x, disc.x + reach_x) if temporal > 0 else (disc.x - reach_x, disc.x)
    x0, x1 = max(0, int(np.floor(x0))), min(w, int(np.ceil(x1)) + 1)
    y0, y1 = max(0, int(np.floor(disc.y - FOVEA_VERTICAL_DD * dd))), min(h, int(np.ceil(disc.y + FOVEA_VERTICAL_DD * dd)) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    radius, erosion = max(1.0, 0.25 * dd), max(1, int(0.3 * dd))

    def padded(margin: int) -> tuple[int, int, int, int]:
        return max(0, x0 - margin), max(0, y0 - margin), min(w, x1 + margin), min(h, y1 + margin)

    bx0, by0, bx1, by1 = padded(int(np.ceil(6 * radius)) + 2)  # beyond the Gaussian's support
    green = np.asarray(square.getchannel("G").crop((bx0, by0, bx1, by1)).filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    green = green[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
    ex0, ey0, ex1, ey1 = padded(erosion)  # the erosion reaches `erosion` pixels; beyond the image counts as outside, as before
    inside = ndimage.binary_erosion(field[ey0:ey1, ex0:ex1], iterations=erosion)[y0 - ey0:y1 - ey0, x0 - ex0:x1 - ex0]
    yy, xx = np.mgrid[y0:y1, x0:x1]
    distance = np.hypot(xx - disc.x, yy - disc.y) / dd
    search = (
        (distance >= FOVEA_DISTANCE_DD[0]) & (distance <= FOVEA_DISTANCE_DD[1])
        & (np.abs(yy - disc.y) <= FOVEA_VERTICAL_DD * dd) & ((xx - disc.x) * temporal > 0) & inside
    )
    if not search.any():
        return None
    k = int(np.argmin(np.where(search, green, np.inf)))
    return float(x0 + k % (x1 - x0)), float(y0 + k // (x1 - x0))


def component_centres(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """(n, 2) x, y centres of the connected regions at least `min_pixels` big."""
    labelled, count = ndimage.label(mask)
    if not count:
        return np.zeros((0, 2))
    index = range(1, count + 1)
    sizes = ndimage.sum_labels(mask, labelled, index)
    centres = np.array(ndimage.center_of_mass(mask, labelled, index)).reshape(-1, 2)[:, ::-1]
    return centres[np.asarray(sizes) >= min_pixels]


def nearest_distance_dd(mask: np.ndarray, point: tuple[float, float], dd: float) -> float | None:
    """Distance from `point` to the nearest foreground pixel, in disc diameters (None if empty)."""
    ys, xs = np.divmod(np.flatnonzero(mask), mask.shape[1])  # flat: 10x faster than np.nonzero on a sparse 512 px mask
    if not len(xs):
        return None
    return float(np.hypot(xs - point[0], ys - point[1]).min() / dd)


def vertical_cdr(disc: np.ndarray, cup: np.ndarray) -> float | None:
    """Vertical cup-to-disc ratio: the cup's height over the disc's height (None without a disc)."""
    disc_rows = np.flatnonzero(disc.any(axis=1))
    if len(disc_rows) < 2:
        return None
    cup_rows = np.flatnonzero((cup & disc).any(axis=1))
    cup_height = (cup_rows[-1] - cup_rows[0] + 1) if len(cup_rows) else 0
    return float(cup_height / (disc_rows[-1] - disc_rows[0] + 1))
