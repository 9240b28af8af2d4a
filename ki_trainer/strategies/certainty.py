"""Certainty-based integration: MUKI (Monte-Carlo-dropout certainty) and its entropy ablation.

Each teacher's certainty on an example is ``s_t = 1 - H(p_t) / log C_t``. The target is the padded
prediction of the most certain teacher (``selection="hard"``) or the certainty-softmax mixture
``sum_t softmax(s / T_s)_t * pad(p_t)`` (``selection="soft"``). With margin re-weighting, each
example counts ``w = s_(1) - s_(2) + 1e-6``: examples where teachers disagree about who is
competent count less. The authors do not renormalise ``w`` (which shrinks the effective learning
rate by ``mean(w)``); ``normalize_weights=True`` divides by the batch mean instead. A pool router's share
weighting (``signals.row_weights``, config ``share_weighting``) multiplies the per-example loss as well.
``within_teacher_weight`` > 0 (``signals.within_teacher_weight`` when set, as resolved for the pool) adds that
multiple of UHC's loss (each teacher matched inside its own classes, on every row, unweighted): every teacher's ranking of its own classes is then learned on every pool row, not only on the rows
routed to it, which is what a teacher that owns few pool rows needs.

``muki`` scores certainty with the mean of K stochastic (dropout-on) passes, because fine-tuned
teachers are over-confident on out-of-domain text and dropout sampling exposes it; ``entropy`` is
the same integration scored from one deterministic pass.
"""

from __future__ import annotations

import torch

from ..numerics import kl_from_log_probs
from .uhc import within_teacher_divergence
from .base import IntegrationOutput, IntegrationStrategy, TeacherSignals, register_strategy

MARGIN_EPSILON = 1e-6


def margin_weights(certainty: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 certainty per example (+1e-6); all ones for a single teacher."""
    if certainty.shape[1] < 2:
        return torch.ones_like(certainty[:, 0])
    top2 = certainty.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1] + MARGIN_EPSILON


class CertaintyIntegration(IntegrationStrategy):
    """Shared implementation; subclasses only choose where the certainty comes from."""

    def teacher_weights(self, certainty: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` mixture weights over teachers (one-hot for hard selection)."""
        if self.options.selection == "hard":
            # Exact ties (e.g. two saturated teachers, both certainty 1.0) share the weight: the result then
            # does not depend on the order the teachers were listed in.
            top = (certainty == certainty.max(1, keepdim=True).values).float()
            return top / top.sum(1, keepdim=True)
        return torch.softmax(certainty / self.options.score_temperature, dim=1)

    def compute(self, student_logits: torch.Tensor, signals: TeacherSignals) -> IntegrationOutput:
        if signals.certainty is None:
            raise ValueError(f"Strategy {self.name!r} needs teacher certainty scores; the signals carry none.")
        tau = self.options.temperature
        certainty = signals.certainty.float()
        alpha = self.teacher_weights(certainty)
        target = sum(
            alpha[:, t : t + 1] * self.label_space.pad(torch.softmax(logits.float() / tau, dim=-1), t)
            for t, logits in enumerate(signals.logits)
        )
        log_probs = torch.log_softmax(student_logits.float() / tau, dim=-1)
        divergence = kl_from_log_probs(target, log_probs) * tau**2
        weights = None
        weighted = divergence
        if self.options.margin_reweighting:
            weights = margin_weights(certainty)
            if self.options.normalize_weights:
                weights = weights / weights.mean()
            weighted = weights * divergence
        if signals.row_weights is not None:  # the router's share weighting (each teacher's domain counts alike)
            weighted = signals.row_weights.to(weighted.device, torch.float32) * weighted
        loss = weighted.mean()
        within_weight = signals.within_teacher_weight
        if within_weight is None:
            within_weight = self.options.within_teacher_weight
        if within_weight > 0:
            within = within_teacher_divergence(student_logits, signals.logits, self.label_space, tau)
            loss = loss + within_weight * within.mean()
        return IntegrationOutput(
            loss=loss, divergence=divergence, weights=weights, selected=certainty.argmax(1), target=target
        )


@register_strategy
class MUKI(CertaintyIntegration):
    name = "muki"
    certainty_source = "mc"
    default_router = "mc_entropy"
    # With cached signals (every pool row's signals known before training) the feature router, fitted
    # label-free on the pool, routes better than MC entropy on every split measured (docs/routing.md).
    cached_default_router = "relative_mahalanobis"


@register_strategy
class EntropySelection(CertaintyIntegration):
    name = "entropy"
    certainty_source = "deterministic"
    default_router = "entropy"
