"""Evaluation metrics for an integrated student, in numpy.

``evaluate.load("accuracy")`` fetches its code from the Hub and fails offline, so the metrics here
are plain numpy (macro-F1 follows scikit-learn's definition: the mean F1 over the classes present
in the gold labels or the predictions; the tests check it against scikit-learn).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .label_space import LabelSpace


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((np.asarray(predictions) == np.asarray(labels)).mean())


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(predictions, labels)
    if len(classes) == 0:
        return float("nan")
    scores = []
    for c in classes:
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def selection_accuracy(certainty: np.ndarray, labels: np.ndarray, label_space: LabelSpace) -> float:
    """Share of examples whose most certain teacher owns the gold class (any owner counts)."""
    ownership = label_space.ownership().numpy()
    chosen = np.asarray(certainty).argmax(1)
    return float(ownership[chosen, np.asarray(labels)].mean()) if len(labels) else float("nan")


def integration_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    label_space: LabelSpace,
    certainty: Optional[np.ndarray] = None,
    routed_predictions: Optional[np.ndarray] = None,
) -> dict[str, float]:
    """Accuracy, macro-F1, accuracy on each teacher's classes and (with certainty) selection accuracy.

    ``routed_predictions`` (union ids: each row's most competent teacher's prediction) add
    ``routed_teacher_accuracy``, the accuracy of the hard-routed teacher ensemble the student compresses.
    Rows whose label is negative (-100: no gold label) are skipped.
    """
    labels = np.asarray(labels)
    labelled = labels >= 0
    labels = labels[labelled]
    predictions = np.asarray(logits)[labelled].argmax(-1)
    if certainty is not None:
        certainty = np.asarray(certainty)[labelled]
    metrics = {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels)}
    ownership = label_space.ownership().numpy()
    for t, name in enumerate(label_space.teacher_names):
        mask = ownership[t, labels]
        metrics[f"accuracy_{name}"] = accuracy(predictions[mask], labels[mask])
    if certainty is not None:
        metrics["teacher_selection_accuracy"] = selection_accuracy(certainty, labels, label_space)
    if routed_predictions is not None:
        metrics["routed_teacher_accuracy"] = accuracy(np.asarray(routed_predictions)[labelled], labels)
    return metrics
