"""The lesion segmenter trains on normal photographs as lesion-free examples, and says how much it marks on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ophglm.finetune.datasets import SEGMENTER_CLASSES, split_of
from ophglm.finetune.train_segmenter import SegmenterConfig, _loss, normal_photographs, train_segmenter
from ophglm.tools.segment_lesions import LESION_VIEWS
from ophglm.tools.synthetic_fundus import make_synthetic_fundus
from ophglm.tools.vision import load_weights, save_weights


def test_loss_ignores_the_channels_a_crop_does_not_know():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 5, 8, 8), torch.zeros(2, 5, 8, 8)
    known = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0.0]])  # the second crop: a normal photograph, disc unannotated
    base = _loss(logits, target, known)
    disc_changed = logits.clone()
    disc_changed[1, 4] += 5
    assert torch.allclose(_loss(disc_changed, target, known), base)
    lesion_changed = logits.clone()
    lesion_changed[1, 0] += 5  # marking a lesion on a healthy retina costs
    assert _loss(lesion_changed, target, known) > base


def _names(prefix: str, split: str, count: int, group) -> list[str]:
    names, n = [], 0
    while len(names) < count:
        n += 1
        if split_of(group(f"{prefix}{n}")) == split:
            names.append(f"{prefix}{n}")
    return names


def test_lesion_training_uses_normals_and_reports_marks_on_them(tmp_path):
    root = tmp_path / "data"
    (root / "idrid_512" / "images").mkdir(parents=True)
    (root / "idrid_512" / "masks").mkdir()
    (root / "classify_4class" / "normal").mkdir(parents=True)
    stems = _names("IDRiD_", "train", 3, lambda s: f"idrid:{s}") + _names("IDRiD_", "val", 1, lambda s: f"idrid:{s}")
    for seed, stem in enumerate(stems):
        fundus = make_synthetic_fundus(512, seed=seed)
        fundus.image.save(root / "idrid_512" / "images" / f"{stem}.jpg")
        for c in SEGMENTER_CLASSES:
            Image.fromarray(fundus.masks[c].astype(np.uint8) * 255).save(root / "idrid_512" / "masks" / f"{stem}_{c}.png")
    normal_ids = _names("", "train", 3, lambda s: f"odir:{s}") + _names("", "val", 2, lambda s: f"odir:{s}")
    for seed, number in enumerate(normal_ids, start=100):
        make_synthetic_fundus(256, seed=seed, lesions=False).image.save(root / "classify_4class" / "normal" / f"{number}_left.jpg")
    assert len(normal_photographs(root, "train")) == 3 and len(normal_photographs(root, "val", 1)) == 1

    out = tmp_path / "lesions.safetensors"
    report = train_segmenter(SegmenterConfig(data=str(root), out=str(out), batch_size=2, minutes=0.1, negative_share=0.5))
    assert report["train_normals"] == 3 and report["validation_normals"] == 2 and report["validation_images"] == 1
    assert 0.0 <= report["normals_marked_share"] <= 1.0 and report["normals_marked_field_percent"] >= 0.0
    assert set(report["aupr_with_normals"]) == set(SEGMENTER_CLASSES)
    assert report["views"] == LESION_VIEWS, "thresholds are chosen on probabilities averaged over the views segment_lesions averages"
    model, config = load_weights(out)
    assert config["recipe"]["negative_share"] == 0.5 and config["classes"] == list(SEGMENTER_CLASSES)
    assert "--negative-share 0.5 --image-size 512 --crop 256" in out.with_suffix(".md").read_text(), "the card says the defaults it ran with"
    # Without normals in training, validation still says how much the weights mark on healthy eyes.
    report = train_segmenter(SegmenterConfig(data=str(root), out=str(out), batch_size=2, minutes=0.05, negative_share=0))
    assert report["train_normals"] == 0 and report["validation_normals"] == 2 and "normals_marked_share" in report


def test_eval_vision_reports_what_the_lesion_tool_marks_on_unseen_normals(tmp_path):
    from ophglm.finetune.evaluate_vision import eval_lesions_on_normals
    from ophglm.tools.segment_lesions import SegmentLesions

    folder = tmp_path / "classify_4class" / "normal"
    folder.mkdir(parents=True)
    chosen_on = SegmenterConfig.validation_normals  # the training's held-out normals are left out of this figure
    for seed, number in enumerate(_names("", "val", chosen_on + 3, lambda s: f"odir:{s}")):
        make_synthetic_fundus(256, seed=seed, lesions=False).image.save(folder / f"{number}_left.jpg")
    tool = SegmentLesions()
    tool.setup()
    report = eval_lesions_on_normals(tmp_path, tool)
    assert report["images"] == 3 and set(report["by_source"]) == {"odir"}
    assert 0.0 <= report["marked_share"] <= 1.0 and report["marked_field_percent_median"] >= 0.0


def test_exact_masks_keep_microaneurysms_a_few_pixels_across():
    """Full-resolution masks shrink 4x: nearest sampling loses many 3 px spots, area sampling keeps every one."""
    from ophglm.finetune.train_segmenter import exact_mask

    rng = np.random.default_rng(0)
    full = np.zeros((2000, 2000), np.uint8)
    for y, x in rng.integers(100, 1900, (12, 2)):
        full[y:y + 3, x:x + 3] = 255
    mask = Image.fromarray(full)
    kept = exact_mask(mask, (0, 0, 2000, 2000), 500)
    from scipy import ndimage
    assert ndimage.label(kept)[1] == 12
    assert ndimage.label(np.asarray(mask.resize((500, 500), Image.NEAREST)) > 127)[1] < 12


def test_zoomed_crops_keep_their_size_and_every_microaneurysm():
    """Scale jitter resizes each crop to the training crop; 2 px spots all survive a 1.5x shrink (the quarter rule)."""
    from scipy import ndimage
    from ophglm.finetune.train_segmenter import TASKS, _batch, _rescaled

    marks = np.zeros((len(SEGMENTER_CLASSES), 192, 192), bool)
    for y, x in np.random.default_rng(1).integers(4, 188, (12, 2)) // 6 * 6:  # apart, so shrunk spots cannot merge
        marks[0, y:y + 2, x:x + 2] = True
    pixels, shrunk = _rescaled(np.full((3, 192, 192), 90, np.uint8), marks, 128)
    assert pixels.shape == (3, 128, 128) and (pixels == 90).all()
    assert ndimage.label(shrunk[0])[1] == ndimage.label(marks[0])[1] and not shrunk[1:].any()
    cfg = SegmenterConfig(crop=128, batch_size=16, zoom=1.0)
    x, y, _ = _batch(np.full((1, 256, 256, 3), 90, np.uint8), np.zeros((1, len(SEGMENTER_CLASSES), 256, 256), bool),
                     np.zeros((0, 256, 256, 3), np.uint8), cfg, TASKS["lesions"], np.random.default_rng(0))
    assert x.shape == (16, 3, 128, 128) and y.shape == (16, len(SEGMENTER_CLASSES), 128, 128)
    with pytest.raises(ValueError, match="--zoom"):
        train_segmenter(SegmenterConfig(zoom=2.0))


def _exact_photograph(folder, stem: str, seed: int) -> None:
    """A synthetic 'full-resolution' photograph: the fundus inside a wider black frame, masks at the same size."""
    fundus = make_synthetic_fundus(384, seed=seed)
    frame = Image.new("RGB", (512, 400))
    frame.paste(fundus.image, (64, 8))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    frame.save(folder / "images" / f"{stem}.jpg")
    for c in SEGMENTER_CLASSES:
        mask = Image.new("L", frame.size)
        mask.paste(Image.fromarray(fundus.masks[c].astype(np.uint8) * 255), (64, 8))
        mask.save(folder / "masks" / f"{stem}_{c}.png")


def test_exact_full_resolution_photographs_train_and_are_reported_apart(tmp_path):
    from ophglm.finetune.datasets import EXACT_MASK_VALIDATION_PERCENT, lesion_records, lesion_split
    from ophglm.finetune.evaluate_vision import eval_lesions
    from ophglm.tools.segment_lesions import SegmentLesions

    root = tmp_path / "data"
    train = _names("IDRiD_", "train", 2, lambda s: f"idrid:{s}")
    held_out = next(s for s in _names("IDRiD_", "train", 40, lambda s: f"idrid:{s}") if split_of(f"idrid:{s}", EXACT_MASK_VALIDATION_PERCENT) == "val")
    approximate_val = _names("IDRiD_", "val", 1, lambda s: f"idrid:{s}")[0]
    for seed, stem in enumerate([*train, approximate_val]):
        fundus = make_synthetic_fundus(512, seed=seed)
        (root / "idrid_512" / "masks").mkdir(parents=True, exist_ok=True)
        (root / "idrid_512" / "images").mkdir(exist_ok=True)
        fundus.image.save(root / "idrid_512" / "images" / f"{stem}.jpg")
        for c in SEGMENTER_CLASSES:
            Image.fromarray(fundus.masks[c].astype(np.uint8) * 255).save(root / "idrid_512" / "masks" / f"{stem}_{c}.png")
    _exact_photograph(root / "idrid_fullres", held_out, 7)
    records = {r.image.stem: r for r in lesion_records(root)}
    assert records[held_out].exact and lesion_split(records[held_out]) == "val", "exact photographs are held out more often"

    out = tmp_path / "fundus_lesions.safetensors"
    report = train_segmenter(SegmenterConfig(data=str(root), out=str(out), batch_size=2, minutes=0.05, negative_share=0, image_size=256, crop=128))
    assert report["validation_images"] == 2 and report["exact_mask_images"] == 1
    assert set(report["aupr_exact_masks"]) == set(SEGMENTER_CLASSES)
    config = load_weights(out)[1]
    assert config["image_size"] == 256 and "--image-size 256 --crop 128" in out.with_suffix(".md").read_text()
    assert config["exact_mask_validation_percent"] == EXACT_MASK_VALIDATION_PERCENT
    with pytest.raises(ValueError, match="--crop must be"):
        train_segmenter(SegmenterConfig(data=str(root), out=str(tmp_path / "x.safetensors"), crop=100, minutes=0.01))
    older = tmp_path / "older_split.safetensors"  # weights made before exact-mask photographs were held out record no such split
    save_weights(load_weights(out)[0], older, {k: v for k, v in config.items() if k != "exact_mask_validation_percent"})
    with pytest.raises(ValueError, match="another validation split"):  # they may have trained on the held-out exact photographs
        train_segmenter(SegmenterConfig(data=str(root), out=str(tmp_path / "x.safetensors"), init=str(older), minutes=0.01))

    tool = SegmentLesions(weights_dir=str(tmp_path))
    tool.setup()
    scores = eval_lesions(root, tool)
    assert scores["exact_masks_full_resolution"]["images"] == 1 and scores["approximate_masks_512px"]["images"] == 1
    assert all(0.0 <= v <= 1.0 for v in scores["exact_masks_full_resolution"]["aupr"].values() if v == v)
    exact = scores["exact_masks_full_resolution"]
    assert any(v is not None for v in exact["aupr_per_photograph_median"].values())
    for c, median in exact["aupr_per_photograph_median"].items():  # one photograph: its own AUPR is the pooled one
        assert median is None or median == exact["aupr"][c]
    tool.config = {k: v for k, v in config.items() if k != "exact_mask_validation_percent"}  # older weights had trained on it
    assert "exact_masks_full_resolution" not in eval_lesions(root, tool)


def test_eval_vision_runs_the_disc_tool_end_to_end_on_normal_and_glaucoma_photographs(tmp_path):
    from ophglm.finetune.evaluate_vision import eval_disc_on_labelled_photographs
    from ophglm.tools.anatomy import MeasureOpticDisc

    for label, seeds in (("normal", range(2)), ("glaucoma", range(2, 4))):
        folder = tmp_path / "classify_4class" / label
        folder.mkdir(parents=True)
        for seed, number in zip(seeds, _names("", "val", 2, lambda s: f"odir:{s}")):
            make_synthetic_fundus(512, seed=seed, lesions=False).image.save(folder / f"{number}_left.jpg")
    (tmp_path / "classify_4class" / "cataract").mkdir()
    make_synthetic_fundus(256, seed=9).image.save(tmp_path / "classify_4class" / "cataract" / "7_left.jpg")
    tool = MeasureOpticDisc()
    tool.setup()
    report = eval_disc_on_labelled_photographs(tmp_path, tool)
    assert report["normal"]["images"] == 2 and report["glaucoma"]["images"] == 2, "only normal and glaucoma photographs count"
    assert report["normal"]["measured_share"] == 1.0 and 0.0 < report["normal"]["vertical_cdr_median"] < 1.0
    assert 0.0 <= report["glaucoma_vs_normal_auroc"] <= 1.0
