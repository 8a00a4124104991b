"""Optic disc / cup and vessel tools, and the fundus geometry they rest on."""

import numpy as np
import pytest
from PIL import Image

from ophglm.finetune.datasets import disc_cup_records, split_of, vessel_records
from ophglm.finetune.metrics import dice, pixel_auroc
from ophglm.session import Session
from ophglm.tools.anatomy import DISC_CUP_FILE, VESSEL_FILE, MeasureOpticDisc, MeasureVessels
from ophglm.tools.measurements import find_disc, locate_fovea, nearest_distance_dd, vertical_cdr
from ophglm.tools.segment_lesions import SegmentLesions
from ophglm.tools.synthetic_fundus import make_synthetic_fundus
from ophglm.tools.vision import fov_mask, fundus_box, square_crop, weights_path


def test_vertical_cdr_is_cup_height_over_disc_height():
    disc, cup = np.zeros((100, 100), bool), np.zeros((100, 100), bool)
    disc[20:80, 30:70] = True
    cup[35:65, 40:60] = True
    assert vertical_cdr(disc, cup) == pytest.approx(0.5)
    assert vertical_cdr(disc, np.zeros_like(cup)) == 0.0
    assert vertical_cdr(np.zeros_like(disc), cup) is None


def test_disc_is_the_largest_region_and_distances_are_in_disc_diameters():
    mask = np.zeros((200, 200), bool)
    yy, xx = np.ogrid[:200, :200]
    mask[(yy - 100) ** 2 + (xx - 150) ** 2 <= 20**2] = True
    mask[5:8, 5:8] = True  # a speck elsewhere
    disc = find_disc(mask)
    assert (disc.x, disc.y) == pytest.approx((150, 100), abs=0.5) and disc.diameter == pytest.approx(40, rel=0.03)
    spot = np.zeros_like(mask)
    spot[100, 70] = True
    assert nearest_distance_dd(spot, (50.0, 100.0), disc.diameter) == pytest.approx(0.5, rel=0.03)


@pytest.mark.parametrize("seed,eye", [(1, "right"), (2, "left"), (8, "right")])
def test_fovea_is_found_near_the_planted_one(seed, eye):
    fundus = make_synthetic_fundus(512, seed=seed, lesions=False, eye=eye)
    disc = find_disc(fundus.masks["OD"])
    fovea = locate_fovea(fundus.image, disc, fundus.fov)
    error_dd = np.hypot(fovea[0] - fundus.fovea_center[0], fovea[1] - fundus.fovea_center[1]) / disc.diameter
    assert error_dd < 0.5, (fovea, fundus.fovea_center)


def test_lesion_findings_carry_disc_areas_and_fovea_distances():
    session = Session()
    image_id = session.add_image(make_synthetic_fundus(768, seed=3).image)
    findings = SegmentLesions()(session, image_id=image_id).findings
    assert findings["fovea"]["detected"]
    ex = findings["lesions"]["EX"]
    assert ex["area_disc_areas"]["unit"] == "disc areas"
    assert ex["nearest_to_fovea"]["unit"] == "disc diameters" and ex["nearest_to_fovea"]["value"] >= 0
    assert findings["macular_exudates"]["value"] == (ex["nearest_to_fovea"]["value"] <= 1.0)


@pytest.mark.parametrize("filename", [DISC_CUP_FILE, VESSEL_FILE])
def test_anatomy_weights_ship_with_a_card(filename):
    path = weights_path(filename)
    assert path.is_file() and "ophglm train segmenter --task" in path.with_suffix(".md").read_text()


def test_tools_measure_a_synthetic_fundus():
    session = Session()
    image_id = session.add_image(make_synthetic_fundus(768, seed=1).image)
    disc = MeasureOpticDisc()(session, image_id=image_id).findings
    assert 0.0 <= disc["vertical_cdr"]["value"] <= 1.0 and disc["vertical_cdr"]["unit"] == "ratio"
    vessels = MeasureVessels()(session, image_id=image_id).findings
    assert 2.0 < vessels["vessel_density"]["value"] < 30.0 and vessels["vessel_density"]["unit"] == "% of field of view"


@pytest.mark.data
def test_disc_and_cup_on_held_out_drishti_crops(shared_data):
    tool = MeasureOpticDisc()
    tool.setup()
    records = [r for r in disc_cup_records(shared_data) if split_of(r.group) == "val"]
    errors = []
    for r in records:
        masks = tool.unet.masks([Image.open(r.image).convert("RGB")])[0]
        size = masks["disc"].shape[::-1]
        truth = {c: np.asarray(Image.open(r.masks[c]).convert("L").resize(size, Image.NEAREST)) > 127 for c in ("disc", "cup")}
        assert dice(masks["disc"], truth["disc"]) > 0.85, r.image.name
        errors.append(abs(vertical_cdr(masks["disc"], masks["cup"]) - vertical_cdr(truth["disc"], truth["cup"])))
    assert np.mean(errors) < 0.15, errors


@pytest.mark.data
def test_vessels_on_held_out_drive_photographs(shared_data):
    tool = MeasureVessels()
    tool.setup()
    for r in [r for r in vessel_records(shared_data) if split_of(r.group, 25) == "val"][:2]:
        image = Image.open(r.image).convert("RGB")
        box = fundus_box(image)
        size = tool.unet.config["image_size"]
        square = square_crop(image, box).resize((size, size))
        probs = tool.unet.probabilities([square])[0, 0]
        truth = np.asarray(square_crop(Image.open(r.masks["vessel"]).convert("L"), box).resize((size, size), Image.NEAREST)) > 127
        field = fov_mask(square)
        assert pixel_auroc(probs[field], truth[field]) > 0.9


def test_the_disc_measurement_reuses_the_lesion_masks_of_the_same_photograph(monkeypatch):
    session = Session()
    image_id = session.add_image(make_synthetic_fundus(512, seed=4).image)
    segmenter, disc_tool = SegmentLesions(), MeasureOpticDisc()
    segmenter(session, image_id=image_id)
    disc_tool.ensure_setup()
    monkeypatch.setattr(disc_tool.locator, "masks_batch", lambda *args: pytest.fail("the lesion Unet ran a second time"))
    assert disc_tool(session, image_id=image_id).findings["vertical_cdr"]["unit"] == "ratio"


def test_a_region_too_small_to_be_the_disc_gives_no_fovea_and_no_distances():
    """A fragment of the disc would put the fovea (2.5 of its diameters away) in the wrong place: the tool says so instead."""
    from ophglm.tools.measurements import DISC_WIDTH_SHARE, disc_width_share
    from ophglm.tools.segment_lesions import LESION_NAMES, without_specks

    fundus = make_synthetic_fundus(512, seed=1)
    tool = SegmentLesions()
    tool.setup()
    disc = find_disc(fundus.masks["OD"])
    assert DISC_WIDTH_SHARE[0] <= disc_width_share(disc, fundus.fov) <= DISC_WIDTH_SHARE[1], "the planted disc is a plausible size"
    yy, xx = np.mgrid[:512, :512]
    fragment = fundus.masks["OD"] & (np.hypot(xx - disc.x, yy - disc.y) < 0.3 * disc.diameter)
    masks = {code: without_specks(fundus.masks[code])[0] for code in LESION_NAMES} | {"OD": fragment}
    counts = {code: without_specks(masks[code])[1] for code in LESION_NAMES}
    result = tool._result("img-x", fundus.image, masks, fundus.fov, counts)
    assert result.findings["optic_disc"]["detected"] is False
    assert result.findings["optic_disc"]["rejected_size"]["value"] < DISC_WIDTH_SHARE[0]
    assert type(result.findings["optic_disc"]["rejected_size"]["value"]) is float, "plain JSON: the conversation store rejects numpy numbers"
    assert "fovea" not in result.findings and "macular_exudates" not in result.findings
    assert not any("nearest_to_fovea" in f or "area_disc_areas" in f for f in result.findings["lesions"].values())
    assert "not found reliably" in result.summary
    whole = tool._result("img-x", fundus.image, masks | {"OD": fundus.masks["OD"]}, fundus.fov, counts)
    assert whole.findings["optic_disc"]["detected"] and whole.findings["fovea"]["detected"]


def test_a_disc_fragment_is_reframed_at_a_typical_size_and_an_implausible_outline_is_refused():
    """measure_optic_disc applies segment_lesions' disc-size rule to its own, sharper outline instead of trusting a fragment."""
    from ophglm.tools.anatomy import MeasuredDisc
    from ophglm.tools.base import ToolError
    from ophglm.tools.measurements import DISC_WIDTH_SHARE, disc_width_share
    from ophglm.tools.segment_lesions import Masks
    from ophglm.tools.vision import as_photo

    fundus = make_synthetic_fundus(512, seed=1)
    planted = find_disc(fundus.masks["OD"])
    yy, xx = np.mgrid[:512, :512]
    fragment = fundus.masks["OD"] & (np.hypot(xx - planted.x, yy - planted.y) < 0.3 * planted.diameter)
    tool = MeasureOpticDisc()
    tool.setup()
    photo = as_photo(fundus.image)
    square = photo.square(512)
    fov = fov_mask(square)
    measured = tool.disc_masks_batch([photo], [Masks(square, {"OD": fragment}, fov, {})])[0]
    assert measured.lesion_width_share < DISC_WIDTH_SHARE[0]
    assert measured.width_share == pytest.approx(disc_width_share(planted, fundus.fov), rel=0.2), "the outline is the planted disc's"
    result = tool._result("img-x", measured)
    assert "disc/cup model alone" in result.summary and type(result.findings["disc_width_share"]["value"]) is float
    assert result.findings["lesion_disc_width_share"]["value"] == round(measured.lesion_width_share, 3)
    whole = tool.disc_masks_batch([photo], [Masks(square, {"OD": fundus.masks["OD"]}, fov, {})])[0]
    framed_on_the_disc = tool._result("img-x", whole)
    assert framed_on_the_disc.findings["vertical_cdr"]["value"] == pytest.approx(result.findings["vertical_cdr"]["value"], abs=0.05)
    assert "lesion_disc_width_share" not in framed_on_the_disc.findings
    with pytest.raises(ToolError, match="not found reliably"):
        tool._result("img-x", MeasuredDisc(measured.masks, measured.diameter, 0.4, measured.lesion_width_share))
