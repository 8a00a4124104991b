"""The Unet tools' batched paths (`run_batch`, what the tool server runs): one forward per batch (per flip view for the lesions), the same results as one at a time."""

import base64
import io
from contextlib import contextmanager

import pytest

from ophglm.session import Session
from ophglm.tools.anatomy import MeasureOpticDisc, MeasureVessels
from ophglm.tools.base import ImageInput, ToolError
from ophglm.tools.non_fundus import non_fundus_images
from ophglm.tools.segment_lesions import LESION_MASKS, SegmentLesions
from ophglm.tools.synthetic_fundus import make_synthetic_fundus
from ophglm.tools.tool_server import ToolCall, ToolsAPI

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def fundus_images():
    return [make_synthetic_fundus(512, seed=seed).image for seed in SEEDS]


@pytest.fixture(scope="module")
def reframed_images():
    """Small photographs whose disc the disc/cup Unet re-frames once or twice (with the shipped weights)."""
    return [make_synthetic_fundus(size, seed=seed).image for size, seed in ((512, 0), (256, 2), (384, 3))]


@pytest.fixture(scope="module")
def rejected_image():
    return next(non_fundus_images(1))[1]  # an ordinary photograph: the quality gate refuses it


@pytest.fixture(scope="module")
def tools():
    found = {tool.name: tool for tool in (SegmentLesions(), MeasureOpticDisc(), MeasureVessels())}
    for tool in found.values():
        tool.ensure_setup()
    return found


def _calls(images) -> list[tuple[ImageInput, Session]]:
    """Each photograph in its own fresh session, as the tool server gives each call."""
    calls = []
    for image in images:
        session = Session()
        calls.append((ImageInput(image_id=session.add_image(image)), session))
    return calls


@contextmanager
def _forwards(*models):
    """The batch size of every forward the models run inside the block."""
    sizes = []
    handles = [model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0])) for model in models]
    try:
        yield sizes
    finally:
        for handle in handles:
            handle.remove()


def _close(batched, single, path="findings"):
    """Equal findings, numbers within 1e-4."""
    if isinstance(single, dict):
        assert batched.keys() == single.keys(), path
        for key in single:
            _close(batched[key], single[key], f"{path}.{key}")
    elif isinstance(single, float):
        assert batched == pytest.approx(single, abs=1e-4), path
    else:
        assert batched == single, path


def test_segment_lesions_runs_one_forward_per_batch_and_fills_the_memo(tools, fundus_images):
    segmenter, disc_tool = tools["segment_lesions"], tools["measure_optic_disc"]
    single = [segmenter.run(inputs, session) for inputs, session in _calls(fundus_images)]
    calls = _calls(fundus_images)
    with _forwards(segmenter.model) as sizes:
        batched = segmenter.run_batch(calls)
    assert sizes == [len(fundus_images)] * segmenter.views, "one forward per flip view, the whole batch in each"
    for b, s in zip(batched, single):
        _close(b.findings, s.findings)
        assert b.artifacts.keys() == s.artifacts.keys()
    assert all((LESION_MASKS, inputs.image_id) in session.derived for inputs, session in calls)
    with _forwards(segmenter.model) as sizes:  # the disc measurement starts from those masks
        disc_tool.run_batch(calls)
    assert sizes == []


def test_measure_vessels_runs_one_forward_per_batch(tools, fundus_images):
    tool = tools["measure_vessels"]
    single = [tool.run(inputs, session) for inputs, session in _calls(fundus_images)]
    with _forwards(tool.unet.model) as sizes:
        batched = tool.run_batch(_calls(fundus_images))
    assert sizes == [len(fundus_images)]
    for b, s in zip(batched, single):
        _close(b.findings, s.findings)


@pytest.mark.parametrize("photographs", ["fundus_images", "reframed_images"])
def test_measure_optic_disc_batches_the_locator_and_each_framing_round(tools, photographs, request):
    tool, fundus_images = tools["measure_optic_disc"], request.getfixturevalue(photographs)
    single, rounds = [], []
    for inputs, session in _calls(fundus_images):
        with _forwards(tool.unet.model) as sizes:
            single.append(tool.run(inputs, session))
        rounds.append(len(sizes))  # 1 to 3 forwards, as the disc needs re-framing
    if photographs == "reframed_images":
        assert max(rounds) > 1, "no photograph was re-framed: pick others, or this test checks less than it says"
    with _forwards(tool.locator.model) as located, _forwards(tool.unet.model) as sizes:
        batched = tool.run_batch(_calls(fundus_images))
    assert located == [len(fundus_images)] * tool.locator.views
    # round r is one forward for the photographs that one-at-a-time runs took more than r forwards for
    assert sizes == [sum(n > r for n in rounds) for r in range(max(rounds))]
    for b, s in zip(batched, single):
        _close(b.findings, s.findings)


@pytest.mark.parametrize("name", ["segment_lesions", "measure_optic_disc", "measure_vessels"])
def test_a_rejected_photograph_raises_its_own_error_before_any_forward(tools, fundus_images, rejected_image, name):
    tool = tools[name]
    (bad_inputs, bad_session), = _calls([rejected_image])
    with pytest.raises(ToolError) as alone:
        tool.run(bad_inputs, bad_session)
    assert f"{name} did not analyse {bad_inputs.image_id}" in str(alone.value)
    good = _calls(fundus_images[:2])
    networks = {"segment_lesions": lambda: [tool.model], "measure_optic_disc": lambda: [tool.locator.model, tool.unet.model],
                "measure_vessels": lambda: [tool.unet.model]}[name]()
    with _forwards(*networks) as sizes, pytest.raises(ToolError) as in_batch:
        tool.run_batch([good[0], (bad_inputs, bad_session), good[1]])
    assert str(in_batch.value) == str(alone.value)
    assert sizes == []  # the gate refuses before the network runs, so the tool server's one-by-one rerun wastes nothing


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_tool_server_answers_the_good_calls_of_a_batch_with_a_rejected_photograph(settings, tools, fundus_images, rejected_image):
    api = ToolsAPI(settings, max_batch_size=8, batch_timeout=0.01)
    api.setup("cpu")
    images = [fundus_images[0], rejected_image, fundus_images[1]]
    for name in tools:
        calls = [ToolCall(tool=name, arguments={"image_id": f"photo{i}"}, images={f"photo{i}": _png(image)}) for i, image in enumerate(images)]
        outputs = api._run(calls)
        assert outputs[1].status_code == 422 and f"{name} did not analyse photo1" in outputs[1].body.decode()
        for i in (0, 2):
            session = Session()
            session.images[f"photo{i}"] = images[i]
            _close(outputs[i]["findings"], tools[name].run(ImageInput(image_id=f"photo{i}"), session).findings)


def test_lesion_masks_are_computed_once_when_both_examining_tools_run_at_once(tools, fundus_images, monkeypatch):
    """The gates call segment_lesions and measure_optic_disc together; the second waits for the first's masks."""
    import threading
    import time

    lesions, disc = tools["segment_lesions"], tools["measure_optic_disc"]
    real, calls = lesions.masks_batch, []

    def slow_masks(images):
        calls.append(len(images))
        time.sleep(0.3)  # long enough that the other thread asks while these are computed
        return real(images)

    monkeypatch.setattr(lesions, "masks_batch", slow_masks)
    monkeypatch.setattr(disc.locator, "masks_batch", slow_masks)
    session = Session()
    image_id = session.add_image(fundus_images[0])
    threads = [threading.Thread(target=tool, args=(session,), kwargs={"image_id": image_id}) for tool in (lesions, disc)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1]


def test_every_vision_tool_crops_to_an_aperture_found_once_per_photograph(tools, fundus_images, monkeypatch):
    """Finding the aperture costs about as much as the classifier's forward: a session finds it once, not per tool."""
    import ophglm.tools.vision as vision
    from ophglm.tools.classify_fundus import ClassifyFundus

    found = []

    def counted(image, real=vision.fundus_box):
        found.append(image.size)
        return real(image)
    monkeypatch.setattr(vision, "fundus_box", counted)
    session = Session()
    image_id = session.add_image(fundus_images[0])
    for tool in (ClassifyFundus(), *tools.values()):
        tool(session, image_id=image_id)
    assert found == [fundus_images[0].size]
