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


def _binned_gap(confidence: np.ndarray, outcome: np.ndarray, bins: int) -> float:
    """Sum over equal-width confidence bins of |observed rate - mean confidence|, weighted by bin share."""
    edges = np.linspace(0, 1, bins + 1)
    gap = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence <= hi)
        if inside.any():
            gap += inside.mean() * abs(outcome[inside].mean() - confidence[inside].mean())
    return float(gap)


def classwise_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Mean over classes of the binary ECE of p(class) against "is this class" (multi-label outputs)."""
    return float(np.mean([_binned_gap(probs[:, c], labels == c, bins) for c in range(probs.shape[1])]))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    return _binned_gap(probs.max(axis=1), probs.argmax(axis=1) == labels, bins)


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


AUPR_LEVELS = 1 << 16  # probabilities binned this finely: far below any difference a figure reports


def aupr(scores: np.ndarray, truth: np.ndarray) -> float:
    """Average precision (sklearn's definition: sum over thresholds of recall gained x precision there).

    Pixel sets reach 50 million at 1024 px, where sorting took minutes per validation; scores
    in [0, 1] are binned into AUPR_LEVELS thresholds and counted instead (linear time).
    Scores outside [0, 1] (not probabilities) go to sklearn's exact computation.
    """
    truth, scores = truth.ravel().astype(bool), scores.ravel()
    if not truth.any():
        return float("nan")
    if scores.min() < 0 or scores.max() > 1:
        return float(average_precision_score(truth, scores))
    bins = np.minimum((scores * AUPR_LEVELS).astype(np.int64), AUPR_LEVELS - 1)
    positives = np.bincount(bins[truth], minlength=AUPR_LEVELS)[::-1].cumsum()  # at each threshold, from the highest
    predicted = np.bincount(bins, minlength=AUPR_LEVELS)[::-1].cumsum()
    gained = np.diff(positives, prepend=0)
    return float((gained * positives / np.maximum(predicted, 1)).sum() / positives[-1])


def pixel_auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    truth = truth.ravel()
    return float(roc_auc_score(truth, scores.ravel())) if 0 < truth.sum() < truth.size else float("nan")


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return float(2 * (prediction & truth).sum() / total) if total else float("nan")
