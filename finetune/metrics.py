"""The figures model cards report: AUROC, ECE, Platt calibration, AUPR and Dice.

One implementation for training-time validation and for `ophglm eval`, so a figure in a
model card and a figure from an evaluation mean the same thing.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score


def fit_platt(logits: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-class scale and bias for sigmoid outputs, minimising validation BCE (Platt scaling).

    A temperature alone cannot undo the prior shift of class-balanced sampling (the network
    sees each class equally often, the world does not); a bias per class can.
    """
    scale = torch.ones(logits.shape[1], requires_grad=True)
    bias = torch.zeros(logits.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([scale, bias], lr=0.1, max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits * scale + bias, targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return scale.detach().tolist(), bias.detach().tolist()


def classwise_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Mean over classes of the binary ECE of p(class) against "is this class" (multi-label outputs)."""
    errors = []
    for c in range(probs.shape[1]):
        p, y = probs[:, c], labels == c
        edges = np.linspace(0, 1, bins + 1)
        ece = 0.0
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = (p > lo) & (p <= hi) if lo > 0 else (p <= hi)
            if inside.any():
                ece += inside.mean() * abs(y[inside].mean() - p[inside].mean())
        errors.append(ece)
    return float(np.mean(errors))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def auroc_per_class(probs: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """One-vs-rest AUROC per class (NaN where a class has no positives or no negatives)."""
    scores = {}
    for i, name in enumerate(classes):
        positive = labels == i
        scores[name] = float(roc_auc_score(positive, probs[:, i])) if 0 < positive.sum() < len(labels) else float("nan")
    return scores


def macro(scores: dict[str, float]) -> float:
    values = [v for v in scores.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def aupr(scores: np.ndarray, truth: np.ndarray) -> float:
    return float(average_precision_score(truth.ravel(), scores.ravel())) if truth.any() else float("nan")


def pixel_auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    truth = truth.ravel()
    return float(roc_auc_score(truth, scores.ravel())) if 0 < truth.sum() < truth.size else float("nan")


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return float(2 * (prediction & truth).sum() / total) if total else float("nan")
