"""The shipped vision weights, run for real on generated photographs (and on real ones when present)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from ophglm.finetune.datasets import CLASSIFIER_CLASSES, classification_records, lesion_records, lesion_split, split_of
from ophglm.finetune.metrics import auroc_per_class, aupr
from ophglm.session import Session
from ophglm.tools.classify_fundus import CLASSIFIER_FILE, ClassifyFundus
from ophglm.tools.segment_lesions import LESION_VIEWS, SEGMENTER_FILE, SegmentLesions
from ophglm.tools.synthetic_fundus import make_synthetic_fundus
from ophglm.tools.vision import weights_path


@pytest.fixture(scope="module")
def classifier():
    return ClassifyFundus()


@pytest.fixture(scope="module")
def segmenter():
    return SegmentLesions()


@pytest.mark.parametrize("filename", [CLASSIFIER_FILE, SEGMENTER_FILE])
def test_shipped_weights_have_a_model_card_with_measured_figures(filename):
    path = weights_path(filename)
    assert path.is_file() and path.stat().st_size < 25_000_000
    card = path.with_suffix(".md").read_text()
    report = json.loads(path.with_suffix(".json").read_text())
    assert "validation_images" in report
    assert "ophglm train" in card, "the card gives the command that made the weights"


def test_classifier_probabilities_are_calibrated_and_batched(classifier):
    session = Session()
    image_id = session.add_image(make_synthetic_fundus(512, seed=1).image)
    result = classifier(session, image_id=image_id)
    probs = {c: p["value"] for c, p in result.findings["probabilities"].items()}
    assert set(CLASSIFIER_CLASSES) == set(probs) and all(0 <= p <= 1 for p in probs.values())
    if classifier.config.get("outputs") == "sigmoid":  # multi-label: each class judged on its own
        assert classifier.config["calibration"]["scale"] and len(classifier.config["calibration"]["bias"]) == len(probs)
    else:
        assert abs(sum(probs.values()) - 1) < 0.01
    assert result.findings["most_likely"] == max(probs, key=probs.get)
    images = [make_synthetic_fundus(384, seed=s).image for s in (1, 2)]
    batched = classifier.predict(images)
    single = [classifier.predict([im])[0] for im in images]
    for b, s in zip(batched, single):
        assert max(abs(b[c] - s[c]) for c in b) < 1e-4


def test_segmenter_reports_units_and_an_overlay_drawn_once_when_read(segmenter, monkeypatch):
    from ophglm.tools import segment_lesions

    drawn, real = [], segment_lesions.overlay_png
    monkeypatch.setattr(segment_lesions, "overlay_png", lambda *a: drawn.append(1) or real(*a))
    fundus = make_synthetic_fundus(768, seed=3)
    session = Session()
    image_id = session.add_image(fundus.image)
    result = segmenter(session, image_id=image_id)
    assert not drawn, "nobody asked for the overlay yet"
    assert bytes(result.artifacts[result.findings["overlay"]]) == bytes(result.artifacts[result.findings["overlay"]]) and len(drawn) == 1
    lesions = result.findings["lesions"]
    assert set(lesions) == {"MA", "HE", "EX", "SE"}
    for finding in lesions.values():
        assert finding["count"]["unit"] == "lesions" and finding["area"]["unit"] == "% of field of view"
        assert finding["count"]["value"] >= 0 and 0 <= finding["area"]["value"] <= 100
    overlay = Image.open(io.BytesIO(bytes(result.artifacts[result.findings["overlay"]])))
    assert overlay.format == "PNG" and overlay.size == (512, 512)


def test_segmenter_finds_the_planted_optic_disc(segmenter):
    fundus = make_synthetic_fundus(768, seed=5, lesions=False)
    session = Session()
    result = segmenter(session, image_id=session.add_image(fundus.image))
    disc = result.findings["optic_disc"]
    assert disc["detected"]
    # the fundus square of a full-aperture photo is the aperture's bounding box
    side = fundus.fov.shape[0]
    rows, cols = np.flatnonzero(fundus.fov.any(1)), np.flatnonzero(fundus.fov.any(0))
    expected_x = (fundus.disc_center[0] - cols[0]) / (cols[-1] - cols[0] + 1)
    expected_y = (fundus.disc_center[1] - rows[0]) / (rows[-1] - rows[0] + 1)
    assert abs(disc["center"]["x"] - expected_x) < 0.06 and abs(disc["center"]["y"] - expected_y) < 0.06, (disc, expected_x, expected_y, side)


@pytest.mark.data
def test_classifier_separates_real_validation_photographs(classifier, shared_data):
    classifier.setup()
    records = [r for r in classification_records(shared_data) if split_of(r.group) == "val"]
    rng = np.random.default_rng(0)
    sample = [records[i] for i in rng.choice(len(records), 120, replace=False)]
    probs = np.array([[p[c] for c in CLASSIFIER_CLASSES] for p in classifier.predict([Image.open(r.path).convert("RGB") for r in sample])])
    labels = np.array([CLASSIFIER_CLASSES.index(r.label) for r in sample])
    scores = auroc_per_class(probs, labels, CLASSIFIER_CLASSES)
    assert np.nanmean(list(scores.values())) > 0.85, scores


@pytest.mark.data
def test_segmenter_finds_real_exudates_and_discs(segmenter, shared_data):
    records = [r for r in lesion_records(shared_data) if lesion_split(r) == "val" and not r.exact][:4]  # 512 px fundus squares
    segmenter.setup()
    size = segmenter.config["image_size"]
    for record in records:
        image = Image.open(record.image).convert("RGB")
        probs = segmenter.probabilities([image.resize((size, size))])[0]
        classes = segmenter.config["classes"]
        for code in ("EX", "OD"):
            truth = np.asarray(Image.open(record.masks[code]).convert("L").resize((size, size), Image.NEAREST)) > 127
            if truth.any():
                assert aupr(probs[classes.index(code)], truth) > 0.3, (record.image.name, code)


def test_tiled_forward_blends_overlapping_tiles_into_the_whole_image_output():
    import torch

    from ophglm.tools.vision import tiled_forward

    torch.manual_seed(0)
    batch = torch.randn(2, 3, 200, 160)
    pointwise = torch.nn.Conv2d(3, 4, 1)
    assert torch.allclose(tiled_forward(pointwise, batch, 64, 16), pointwise(batch), atol=1e-5), "tiles cover every pixel once, weights sum to one"
    local = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3, padding=1))
    whole, tiled = local(batch), tiled_forward(local, batch, 64, 16)
    assert tiled.shape == whole.shape
    # A tile's outermost 2 px see zero padding instead of the neighbours; the ramp gives them little weight where tiles overlap.
    error = (tiled - whole).abs()
    assert error.max() < 0.1 * whole.abs().max() and error.mean() < 0.01 * whole.abs().mean()
    with pytest.raises(ValueError, match="overlap"):
        tiled_forward(pointwise, batch, 64, 64)


def test_flip_views_are_averaged_each_mapped_back_onto_the_photograph():
    import torch

    from ophglm.tools.vision import flip_averaged

    batch = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6)
    assert torch.equal(flip_averaged(lambda x: x * 2, batch, 4), batch * 2), "a pixelwise network's views agree once flipped back"
    ramp = torch.linspace(0, 1, 6)  # a network that favours the right-hand side: the views disagree, and the mean is theirs
    views = [batch * ramp, (batch.flip(3) * ramp).flip(3), (batch.flip(2) * ramp).flip(2), (batch.flip((2, 3)) * ramp).flip((2, 3))]
    for n in (1, 2, 4):
        assert torch.allclose(flip_averaged(lambda x: x * ramp, batch, n), sum(views[:n]) / n)
    with pytest.raises(ValueError, match="views must be 1 to 4"):
        flip_averaged(lambda x: x, batch, 5)


def test_segmenter_views_come_from_the_settings_and_the_disc_tool_shares_them(segmenter):
    from ophglm.settings import load_settings
    from ophglm.tools.registry import vision_tools

    assert load_settings().lesion_views == LESION_VIEWS, "the settings' default is the tool's own"
    tools = {t.name: t for t in vision_tools(load_settings(lesion_views=2), "cpu")}
    assert tools["segment_lesions"].views == 2 and tools["measure_optic_disc"].locator.views == 2, "one memo per photograph, one way of making it"
    segmenter.setup()
    fundus = make_synthetic_fundus(512, seed=3)
    square = fundus.image
    one_view = SegmentLesions(views=1)
    one_view.model, one_view.config = segmenter.model, segmenter.config
    averaged, single = segmenter.probabilities([square])[0], one_view.probabilities([square])[0]
    assert averaged.shape == single.shape and 0 < np.abs(averaged - single).mean() < 0.01, "the views differ a little, pixel by pixel"
    disc = segmenter.config["classes"].index("OD")
    assert aupr(averaged[disc], fundus.masks["OD"]) > 0.5


def test_tiled_forward_and_flip_views_keep_their_work_on_the_batch_device():
    import torch

    from ophglm.tools.vision import flip_averaged, tiled_forward

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    local = torch.nn.Conv2d(3, 2, 3, padding=1)
    batch = torch.randn(1, 3, 200, 160)
    on_gpu = tiled_forward(local.cuda(), batch.cuda(), 64, 16)
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), tiled_forward(local.cpu(), batch, 64, 16), atol=1e-4)
    views = flip_averaged(local.cuda(), batch.cuda(), 4)
    assert views.device.type == "cuda" and torch.allclose(views.cpu(), flip_averaged(local.cpu(), batch, 4), atol=1e-4)


def test_eval_vision_speed_compares_each_tool_call_with_its_bare_forward(classifier, segmenter):
    from ophglm.finetune.evaluate_vision import eval_speed
    from ophglm.tools.anatomy import MeasureOpticDisc, MeasureVessels
    from ophglm.tools.assess_quality import AssessQuality

    tools = {"assess_quality": AssessQuality(), "classify_fundus": classifier, "segment_lesions": segmenter,
             "measure_optic_disc": MeasureOpticDisc(), "measure_vessels": MeasureVessels()}
    for tool in tools.values():
        tool.setup()
    report = eval_speed(tools, make_synthetic_fundus(768, seed=4).image, repeats=1)
    assert set(report) == set(tools) and all(r["tool_images_per_second"] > 0 for r in report.values())
    for name in ("classify_fundus", "segment_lesions", "measure_vessels"):  # the three with one network of their own
        assert report[name]["forward_images_per_second"] > 0 and report[name]["tool_over_forward_time"] > 0, report[name]
        tool_s, forward_s = 1 / report[name]["tool_images_per_second"], 1 / report[name]["forward_images_per_second"]
        rounding_ms = 1000 * 0.005 * (tool_s ** 2 + forward_s ** 2) + 0.05  # images/s are rounded to 0.01, milliseconds to 0.1
        assert abs(report[name]["tool_minus_forward_ms"] - 1000 * (tool_s - forward_s)) <= rounding_ms, report[name]
    assert report["segment_lesions"]["views"] == segmenter.views, "its bare forward is every view it averages"
    assert "forward_images_per_second" not in report["measure_optic_disc"]  # two networks, up to three rounds: no one forward


@pytest.mark.parametrize("side, size", [(2048, 288), (700, 512), (256, 288)])
def test_fundus_square_resizes_as_pillow_does_and_a_photo_gives_the_same_input(side, size):
    """Training resized with Pillow's bilinear filter; the tools' torch resize must give the networks the same pixels."""
    import torch

    from ophglm.tools.vision import as_photo, fundus_square, to_tensor

    image = make_synthetic_fundus(side, seed=2).image.crop((0, 0, side, side * 3 // 4))  # a wide frame, as cameras give
    box = (0, 0, image.width, image.height)
    square = np.asarray(fundus_square(image, size, box), dtype=int)
    height = round(image.height * size / image.width)
    top = (size - height) // 2
    pillow = np.asarray(image.resize((size, height), Image.BILINEAR), dtype=int)
    assert np.abs(square[top:top + height] - pillow).max() <= 1
    assert not square[:top].any() and not square[top + height:].any(), "padded with black above and below"
    photo = as_photo(image)
    assert photo.square(size) == fundus_square(image, size)
    assert torch.equal(photo.tensor(size), to_tensor(photo.square(size), size))


def test_specks_are_dropped_and_the_lesions_left_are_counted():
    from scipy import ndimage

    from ophglm.tools.segment_lesions import without_specks

    rng = np.random.default_rng(0)
    for density in (0.0, 0.002, 0.02, 0.2):
        mask = ndimage.binary_dilation(rng.random((512, 512)) < density) | (rng.random((512, 512)) < density / 4)
        kept, count = without_specks(mask)
        labelled, total = ndimage.label(mask)
        sizes = np.bincount(labelled.ravel())
        expected = np.isin(labelled, np.flatnonzero(sizes >= 3)) & mask
        assert (kept == expected).all() and count == ndimage.label(expected)[1]
        assert count <= total
