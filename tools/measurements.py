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
    sizes = ndimage.sum_labels(mask, labelled, range(1, count + 1))
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] < min_pixels:
        return None
    ys, xs = np.nonzero(labelled == biggest)
    area = len(xs)
    return Disc(float(xs.mean()), float(ys.mean()), float(2 * np.sqrt(area / np.pi)), area)


def locate_fovea(square: Image.Image, disc: Disc, field: np.ndarray) -> tuple[float, float] | None:
    """The darkest smoothed spot in the annulus 1.8-3.2 DD from the disc, on the side towards the field's centre."""
    dd = disc.diameter
    green = np.asarray(square.getchannel("G").filter(ImageFilter.GaussianBlur(max(1.0, 0.25 * dd))), dtype=np.float32)
    h, w = green.shape
    yy, xx = np.mgrid[:h, :w]
    centre_x = float(np.nonzero(field)[1].mean()) if field.any() else w / 2
    temporal = np.sign(centre_x - disc.x) or 1.0  # the macula lies towards the middle of the photograph
    distance = np.hypot(xx - disc.x, yy - disc.y) / dd
    search = (
        (distance >= FOVEA_DISTANCE_DD[0]) & (distance <= FOVEA_DISTANCE_DD[1])
        & (np.abs(yy - disc.y) <= FOVEA_VERTICAL_DD * dd) & ((xx - disc.x) * temporal > 0)
        & ndimage.binary_erosion(field, iterations=max(1, int(0.3 * dd)))
    )
    if not search.any():
        return None
    k = int(np.argmin(np.where(search, green, np.inf)))
    return float(k % w), float(k // w)


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
    ys, xs = np.nonzero(mask)
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
