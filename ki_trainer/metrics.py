"""Evaluation metrics for an integrated student, in numpy.

``evaluate.load("accuracy")`` fetches its code from the Hub and fails offline, so the metrics here
are plain numpy (macro-F1 follows scikit-learn's definition: the mean F1 over the classes present
in the gold labels or the predictions; the tests check it against scikit-learn).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from transformers.utils import logging

from .label_space import LabelSpace
from .strategies import TeacherSignals

logger = logging.get_logger(__name__)


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
    """Share of examples whose most certain teacher owns the gold class (any owner counts). A row where several
    teachers are exactly equally certain counts the share of them that own it (``argmax`` would pick the teacher
    listed first, and the metric would depend on the teachers' order)."""
    if not len(labels):
        return float("nan")
    ownership = label_space.ownership().numpy()
    certainty = np.asarray(certainty)
    top = certainty == certainty.max(1, keepdims=True)
    owns = ownership[:, np.asarray(labels)].T  # [rows, teachers]
    return float(((top & owns).sum(1) / np.maximum(top.sum(1), 1)).mean())


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


def routed_teacher_predictions(signals: TeacherSignals, label_space: LabelSpace) -> torch.Tensor:
    """``[B]`` union ids: the prediction of each row's most competent teacher (highest certainty/router score).

    Its accuracy (``routed_teacher_accuracy``) is that of the hard-routed ensemble the student compresses.
    """
    chosen = signals.certainty.argmax(1)
    per_teacher = torch.stack([
        label_space.teacher_to_union(t).to(logits.device)[logits.argmax(1)]
        for t, logits in enumerate(signals.logits)
    ], dim=1)
    return per_teacher.gather(1, chosen.to(per_teacher.device).unsqueeze(1)).squeeze(1)


def evaluation_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    label_space: LabelSpace,
    certainty: Optional[np.ndarray] = None,
    routed_predictions: Optional[np.ndarray] = None,
    user_metrics: Optional[Callable[[], dict]] = None,
) -> dict[str, float]:
    """The metrics of one evaluation: :func:`integration_metrics` over the labelled rows (with ``labelled_rows``),
    nothing but a warning when no row has a gold label, then the user's own ``compute_metrics`` (``user_metrics``).
    Certainty/routed predictions not gathered for every row are dropped with a warning."""
    if certainty is not None and len(certainty) != len(labels):
        logger.warning("Teacher certainty was not gathered for every eval example; skipping selection accuracy.")
        certainty = routed_predictions = None
    labels = np.asarray(labels)
    unlabelled = int((labels < 0).sum())
    if unlabelled == len(labels):
        logger.warning("No evaluation row has a gold label: only the KI loss is reported.")
        metrics = {}
    else:
        if unlabelled:
            logger.warning(f"{unlabelled} of {len(labels)} evaluation rows have no gold label; metrics skip them.")
        metrics = integration_metrics(logits, labels, label_space, certainty, routed_predictions=routed_predictions)
        metrics["labelled_rows"] = len(labels) - unlabelled
    if user_metrics is not None:
        metrics.update(user_metrics())
    return metrics


class EvaluationRows:
    """What an evaluation gathers per batch besides the student's logits: each row's teacher certainty (or router
    scores) and the routed ensemble's prediction, for ``teacher_selection_accuracy`` / ``routed_teacher_accuracy``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.certainty: list[torch.Tensor] = []
        self.routed: list[torch.Tensor] = []  # the most competent teacher's prediction (union ids) per row

    def add(self, signals: Optional[TeacherSignals], label_space: LabelSpace, gather: Callable) -> None:
        """One batch's rows (``gather``: the accelerator's ``gather_for_metrics``); nothing without certainty."""
        if signals is None or signals.certainty is None:
            return
        self.certainty.append(gather(signals.certainty).cpu())
        self.routed.append(gather(routed_teacher_predictions(signals, label_space)).cpu())

    def metrics(self, logits: np.ndarray, labels: np.ndarray, label_space: LabelSpace,
                user_metrics: Optional[Callable[[], dict]] = None) -> dict[str, float]:
        certainty = torch.cat(self.certainty).numpy() if self.certainty else None
        routed = torch.cat(self.routed).numpy() if self.routed else None
        return evaluation_metrics(logits, labels, label_space, certainty, routed, user_metrics)
