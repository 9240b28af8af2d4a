"""Confidence routers: each teacher scores itself from its own output distribution, row by row.

They need no fit and work on the fly as well as from cached signals. Cost in teacher forward passes
per example and teacher: 1 for the deterministic ones, 1 + K for the Monte-Carlo ones.

* ``max_prob``: the top softmax probability (the classic OOD baseline).
* ``energy``: ``sigmoid(logsumexp(logits) - log C)``, the free energy of Liu et al. (2020) mapped to
  (0, 1); in-domain inputs get large logits.
* ``entropy``: ``1 - H(p) / log C`` of one deterministic pass (MUKI's ablation).
* ``mc_entropy``: ``1 - H(mean_k p_k) / log C`` over K dropout passes: MUKI as published, the default.
* ``mc_mutual_information``: ``1 - MI`` where MI (BALD) is the normalised mutual information between
  the prediction and the dropout mask, the epistemic part of the uncertainty.
* ``mc_variance``: ``1 - 4 Var_k p_k(top)``: how much the top-class probability moves under dropout.

All of them are certainties of a teacher in ITSELF: teachers of different architectures or
languages are calibrated differently, which is what ``certainty_normalization="standardize"`` and
the transductive routers in :mod:`ki_trainer.routing.pool` address.
"""

from __future__ import annotations

import math

import torch

from ..numerics import certainty_from_logits
from ..strategies.base import TeacherSignals
from .base import Router, register_router


@register_router
class MaxProbRouter(Router):
    name = "max_prob"
    requires = frozenset({"logits"})

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        self._check(signals)
        return torch.stack([torch.softmax(x.float(), -1).max(-1).values for x in signals.logits], dim=1)


@register_router
class EnergyRouter(Router):
    name = "energy"
    requires = frozenset({"logits"})

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        self._check(signals)
        return torch.stack(
            [torch.sigmoid(torch.logsumexp(x.float(), -1) - math.log(x.shape[-1])) for x in signals.logits], dim=1
        )


@register_router
class EntropyRouter(Router):
    name = "entropy"
    requires = frozenset({"logits"})

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        self._check(signals)
        return torch.stack([certainty_from_logits(x) for x in signals.logits], dim=1)


@register_router
class MCEntropyRouter(Router):
    name = "mc_entropy"
    requires = frozenset({"logits", "mc"})

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        self._check(signals)
        return signals.certainty.float()


@register_router
class MCMutualInformationRouter(Router):
    name = "mc_mutual_information"
    requires = frozenset({"logits", "mc"})

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        self._check(signals)
        return (1.0 - signals.mutual_information.float()).clamp(0.0, 1.0)


@register_router
class MCVarianceRouter(Router):
    name = "mc_variance"
    requires = frozenset({"logits", "mc"})

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        self._check(signals)
        return (1.0 - 4.0 * signals.top_variance.float()).clamp(0.0, 1.0)
