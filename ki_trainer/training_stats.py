"""What a training run logs besides the loss: the mean divergence to the teachers, the mean certainty margin,
and each teacher's mean certainty and selection share.

Statistics accumulate on the device (no host sync per step); :meth:`TrainingStats.logs` reduces them over
processes at a logging step.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

from .strategies import IntegrationOutput, TeacherSignals

logger = logging.get_logger(__name__)

MARGIN_COLLAPSE = 1e-3  # mean top-2 certainty margin below which margin re-weighting stalls learning


class TrainingStats:
    def __init__(self, teacher_names: list[str], device: torch.device) -> None:
        self.teacher_names = list(teacher_names)
        self.device = device
        self.margin_warned = False
        self.reset()

    def reset(self) -> None:
        n = len(self.teacher_names)
        device = self.device
        self.sums = {
            "divergence": torch.zeros((), device=device),
            "margin": torch.zeros((), device=device),
            "certainty": torch.zeros(n, device=device),
            "selected": torch.zeros(n, device=device),
            "rows": torch.zeros((), device=device),
        }
        self.pending = False

    def accumulate(self, result: IntegrationOutput, signals: TeacherSignals) -> None:
        """Add one training step (on device, no host sync)."""
        sums = self.sums
        sums["divergence"] += result.divergence.detach().sum()
        sums["rows"] += result.divergence.shape[0]
        if result.weights is not None:
            sums["margin"] += result.weights.detach().sum()
        if signals.certainty is not None:
            sums["certainty"] += signals.certainty.detach().float().sum(0)
            # Exact ties are split evenly (argmax would credit the teacher listed first).
            certainty = signals.certainty.detach().float()
            top = (certainty == certainty.max(1, keepdim=True).values).float()
            sums["selected"] += (top / top.sum(1, keepdim=True).clamp_min(1.0)).sum(0)
        self.pending = True

    def logs(self, accelerator, args, reads_certainty: bool) -> dict[str, float]:
        """The statistics since the last call, reduced over processes (then reset); ``{}`` when none."""
        if not self.pending:
            return {}
        stats = {k: accelerator.reduce(v, reduction="sum") for k, v in self.sums.items()}
        rows = max(float(stats["rows"]), 1.0)
        logs = {"kd_divergence": round(float(stats["divergence"]) / rows, 6)}
        if reads_certainty:
            if args.margin_reweighting and len(self.teacher_names) > 1:
                logs["mean_margin"] = round(float(stats["margin"]) / rows, 6)
                self._warn_margin_collapse(float(stats["margin"]) / rows, args)
            for name, certainty, selected in zip(
                self.teacher_names, stats["certainty"].tolist(), stats["selected"].tolist()
            ):
                logs[f"certainty_{name}"] = round(certainty / rows, 6)
                logs[f"selection_share_{name}"] = round(selected / rows, 6)
        self.reset()
        return logs

    def _warn_margin_collapse(self, mean_margin: float, args) -> None:
        if mean_margin >= MARGIN_COLLAPSE or self.margin_warned or args.normalize_margin_weights:
            return
        self.margin_warned = True
        logger.warning(
            f"The mean margin between the two most certain teachers is {mean_margin:.2g}: the teachers are about "
            "equally certain everywhere (near-duplicate or uniformly unsure teachers), so margin re-weighting "
            "shrinks every update to ~0 and the student barely learns. Check the teachers, or set "
            "normalize_margin_weights=True or margin_reweighting=False."
        )
