"""Standardization (z-scores): each teacher's scores compared with that teacher's own mean and spread.

The one place the z-score is written: ``certainty_normalization="standardize"`` (fitted on the training rows'
scores) and the pool routers that standardize their per-teacher scores (:mod:`ki_trainer.routing.pool`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..strategies import TeacherSignals

MIN_STD = 1e-6  # a teacher whose scores never vary is compared by its offset from the mean, not divided by 0


def zscore_fit(scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-column mean and (population) standard deviation of ``scores`` ``[rows, teachers]``."""
    return {"mean": scores.mean(0), "std": scores.std(0, unbiased=False).clamp_min(MIN_STD)}


def zscore(scores: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    return (scores - stats["mean"].to(scores.device)) / stats["std"].to(scores.device)


def certainty_statistics(certainty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per teacher of the scores of the training rows: what ``certainty_normalization`` fits."""
    stats = zscore_fit(certainty.float())
    return stats["mean"], stats["std"]


def standardize(signals: TeacherSignals, statistics: Optional[tuple[torch.Tensor, torch.Tensor]]) -> TeacherSignals:
    """``signals`` with each teacher's certainty z-scored with ``statistics`` (unchanged without certainty)."""
    if signals.certainty is None:
        return signals
    if statistics is None:
        raise RuntimeError(
            "certainty_normalization='standardize' needs the per-teacher statistics of the training rows; they are "
            "fitted when train(), evaluate() or precompute_teacher_signals() sets up the cached signals."
        )
    mean, std = statistics
    return dataclasses.replace(signals, certainty=zscore(signals.certainty.float(), {"mean": mean, "std": std}))
