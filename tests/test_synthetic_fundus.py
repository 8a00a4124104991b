"""The synthetic fundus is the project's own test data, so its ground truth must be trustworthy."""

import numpy as np
import pytest
from scipy import ndimage

from ophglm.tools.synthetic_fundus import LESION_CLASSES, SyntheticFundus, make_synthetic_fundus

SIZE = 256


@pytest.fixture(scope="module")
def fundus() -> SyntheticFundus:
    return make_synthetic_fundus(SIZE, seed=3)


def _pixels(f: SyntheticFundus) -> np.ndarray:
    return np.asarray(f.image, dtype=np.float64)


def test_deterministic_per_seed():
    a, b = make_synthetic_fundus(SIZE, seed=7), make_synthetic_fundus(SIZE, seed=7)
    assert np.array_equal(_pixels(a), _pixels(b))
    assert a.lesions == b.lesions
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert not np.array_equal(_pixels(a), _pixels(make_synthetic_fundus(SIZE, seed=8)))


def test_shapes_and_dtypes(fundus):
    assert fundus.image.mode == "RGB" and fundus.image.size == (SIZE, SIZE)
    assert set(fundus.masks) == {*LESION_CLASSES, "OD"}
    for m in [*fundus.masks.values(), fundus.fov]:
        assert m.shape == (SIZE, SIZE) and m.dtype == bool
    assert fundus.disc_radius > 0 and len(fundus.disc_center) == 2 and len(fundus.fovea_center) == 2


def test_outside_aperture_is_black_and_masks_inside(fundus):
    assert _pixels(fundus)[~fundus.fov].max() == 0
    for m in fundus.masks.values():
        assert not (m & ~fundus.fov).any()


@pytest.mark.parametrize("eye", ["right", "left"])
def test_disc_on_nasal_side_and_fovea_temporal(eye):
    f = make_synthetic_fundus(SIZE, seed=1, eye=eye)
    x, y = f.disc_center
    assert f.masks["OD"][round(y), round(x)]
    nasal = 1 if eye == "right" else -1  # as the photo is viewed
    assert nasal * (x - SIZE / 2) > 0.2 * SIZE
    assert nasal * (f.fovea_center[0] - x) < -2 * f.disc_radius


def test_every_lesion_centre_is_in_its_mask(fundus):
    kinds = {d["kind"] for d in fundus.lesions}
    assert kinds == set(LESION_CLASSES)
    for d in fundus.lesions:
        assert fundus.masks[d["kind"]][round(d["y"]), round(d["x"])], d


def test_healthy_fundus_has_only_the_disc():
    f = make_synthetic_fundus(SIZE, seed=3, lesions=False)
    assert f.lesions == []
    assert not any(f.masks[k].any() for k in LESION_CLASSES)
    assert f.masks["OD"].any()


def test_disc_bright_and_haemorrhages_dark(fundus):
    brightness = _pixels(fundus).sum(axis=2)
    assert brightness[fundus.masks["OD"]].mean() > 1.2 * brightness[fundus.fov].mean()
    he = fundus.masks["HE"]
    ring = ndimage.binary_dilation(he, iterations=6) & ~ndimage.binary_dilation(he, iterations=2) & fundus.fov
    assert brightness[he].mean() < 0.85 * brightness[ring].mean()


def test_bright_lesions_are_brighter_than_their_surroundings(fundus):
    brightness = _pixels(fundus).sum(axis=2)
    ex = fundus.masks["EX"]
    ring = ndimage.binary_dilation(ex, iterations=6) & ~ndimage.binary_dilation(ex, iterations=2) & fundus.fov
    assert brightness[ex].mean() > brightness[ring].mean()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"size": 32}, "size"), ({"size": 100.0}, "size"), ({"eye": "both"}, "eye"), ({"eye": "Right"}, "eye")],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_fundus(**kwargs)
