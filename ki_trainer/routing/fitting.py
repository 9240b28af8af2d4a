"""Fitting the scoring before any training or evaluation step: what the teachers' signals must carry, a
transductive router fitted on the unlabeled pool (label-free, from cached signals), and its saved state.

The trainer calls these in the set-up of ``train()`` / ``evaluate()`` / ``predict()``; a step only scores.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np
import torch
from transformers.utils import logging

from ..strategies import TeacherSignals
from .base import Router
from .standardization import certainty_statistics, standardize

logger = logging.get_logger(__name__)

ROUTER_STATE_FILE = "router_state.pt"


@dataclasses.dataclass(frozen=True)
class SignalNeeds:
    """What a run reads from the teachers: which certainty (``"mc"``, ``"deterministic"`` or ``None``) and whether
    pooled features."""

    certainty_source: Optional[str]
    features: bool = False

    @property
    def mc(self) -> bool:
        """Whether Monte-Carlo statistics are read (K dropout passes per teacher and row)."""
        return self.certainty_source == "mc"


def signal_needs(strategy, router: Optional[Router]) -> SignalNeeds:
    """The strategy's certainty without a router; with one, MC when the router reads MC statistics (else the
    deterministic certainty), and pooled features when it reads them."""
    if router is None:
        return SignalNeeds(strategy.certainty_source, False)
    return SignalNeeds("mc" if "mc" in router.requires else "deterministic", "features" in router.requires)


SHARE_WEIGHTINGS = ("balanced", "pool")


def _checked_share_weighting(share_weighting: str) -> str:
    if share_weighting not in SHARE_WEIGHTINGS:
        raise ValueError(f"share_weighting must be one of {SHARE_WEIGHTINGS}, got {share_weighting!r}.")
    return share_weighting


# within_teacher_kd=None: this multiple of UHC's loss where share_weighting="balanced" applies (a pool router that
# found the pool skewed), none elsewhere (docs/routing.md, 'Skewed pools').
AUTO_WITHIN_TEACHER_KD = 1.0


def within_teacher_weight(router: Optional[Router], share_weighting: str, within_teacher_kd: Optional[float]
                          ) -> float:
    """The resolved ``within_teacher_kd``: as given, or (``None``) ``AUTO_WITHIN_TEACHER_KD`` where the balanced share
    weighting applies (a fitted pool router whose pool shares, estimated or given, are skewed) and 0 elsewhere."""
    if within_teacher_kd is not None:
        return float(within_teacher_kd)
    skewed = share_weighting == "balanced" and bool(getattr(router, "skewed", False))
    return AUTO_WITHIN_TEACHER_KD if skewed else 0.0


def score(router: Optional[Router], signals: TeacherSignals, share_weighting: str = "pool",
          margin_weighted: bool = True, within_teacher_kd: Optional[float] = None) -> TeacherSignals:
    """``signals`` with ``certainty`` replaced by the router's competence scores (unchanged without a router); with
    ``share_weighting="balanced"`` and a router that uses an estimate of the pool's teacher shares, ``row_weights``
    too (every teacher's routed rows carry the same total loss weight; ``margin_weighted``: counting each row by its
    margin, as the strategy's margin re-weighting does). With ``within_teacher_kd=None`` (the config's default) and
    the balanced weighting in use, ``within_teacher_weight`` is set to ``AUTO_WITHIN_TEACHER_KD``; otherwise it stays
    ``None`` and the strategy's own ``StrategyOptions.within_teacher_weight`` (the config's explicit value) applies."""
    if router is None:
        return signals
    _checked_share_weighting(share_weighting)
    scores = router.score(signals).to(signals.logits[0].device)
    row_weights = None
    if share_weighting == "balanced" and hasattr(router, "row_weights"):
        row_weights = router.row_weights(scores, margin_weighted)
    auto = within_teacher_kd is None and within_teacher_weight(router, share_weighting, None) > 0
    return dataclasses.replace(signals, certainty=scores, row_weights=row_weights,
                               within_teacher_weight=AUTO_WITHIN_TEACHER_KD if auto else None)


def fit_on_pool(router: Router, cache, ids: Sequence[str], certainty_source: Optional[str],
                limit: Optional[int] = None, seed: int = 0) -> int:
    """Fit ``router`` on the cached signals of the pool rows ``ids`` (never text, ids or gold labels reach it);
    at most ``limit`` rows, a seeded random subset. Returns the number of rows it was fitted on."""
    ids = list(ids)
    if limit is not None and len(ids) > limit:  # a seeded random subset (ids only: no text, no label)
        chosen = np.random.default_rng(seed).choice(len(ids), size=limit, replace=False)
        ids = [ids[i] for i in sorted(chosen.tolist())]
    router.fit(cache.lookup(ids, certainty_source))
    return len(ids)


def save_router_state(router: Optional[Router], directory: str) -> None:
    """Write a fitted transductive router's state to ``<directory>/router_state.pt`` (atomically)."""
    if router is None or not router.needs_fit or not router.fitted:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, ROUTER_STATE_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(router.state_dict(), tmp)
    os.replace(tmp, path)


def load_router_state(router: Optional[Router], directory: str) -> Optional[str]:
    """Load a transductive router's fitted state from ``directory``; returns the file read (``None``: none)."""
    path = os.path.join(directory, ROUTER_STATE_FILE)
    if router is None or not router.needs_fit or not os.path.isfile(path):
        return None
    router.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    logger.info(f"Router {router.name!r}: fitted state loaded from {path}.")
    return path


class Scoring:
    """How a batch's teacher signals become the certainty the strategy reads: the router's competence scores (when
    a router is configured), then ``certainty_normalization``. Fitted in the set-up (the router on the unlabeled
    pool, the statistics on the training rows' scores), applied per batch."""

    def __init__(self, router: Optional[Router], normalization: str = "none", share_weighting: str = "pool",
                 margin_weighted: bool = True, within_teacher_kd: Optional[float] = None) -> None:
        self.router = router
        self.normalization = normalization
        self.share_weighting = _checked_share_weighting(share_weighting)
        self.margin_weighted = margin_weighted  # the strategy weights rows by their margin (balanced by margin mass)
        self.within_teacher_kd = within_teacher_kd  # None: resolved from the fitted router (within_teacher_weight)
        self.statistics: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # per-teacher mean, std

    @classmethod
    def from_args(cls, router: Optional[Router], args, teachers: Optional[int] = None) -> "Scoring":
        """The scoring a ``KnowledgeIntegrationConfig`` asks for, around ``router`` (its options checked against the
        number of ``teachers``, when given)."""
        if router is not None and teachers is not None:
            router.check_teachers(teachers)
        return cls(router).follow(args)

    def follow(self, args) -> "Scoring":
        """Take the config's scoring fields (again: a hyper-parameter trial may have set them); the fitted router and
        statistics stay."""
        self.normalization = args.certainty_normalization
        self.share_weighting = _checked_share_weighting(args.share_weighting)
        self.margin_weighted = args.margin_reweighting
        self.within_teacher_kd = args.within_teacher_kd
        return self

    def __call__(self, signals: TeacherSignals) -> TeacherSignals:
        return self.standardize(self.route(signals))

    def route(self, signals: TeacherSignals) -> TeacherSignals:
        return score(self.router, signals, self.share_weighting, self.margin_weighted, self.within_teacher_kd)

    def standardize(self, signals: TeacherSignals) -> TeacherSignals:
        return signals if self.normalization == "none" else standardize(signals, self.statistics)

    def share_notes(self, names: Sequence[str]) -> tuple[Optional[str], Optional[str]]:
        """What the fitted router found in the pool, in words, for the log and the model card: its estimate of the
        teachers' shares (``"the pool looks 88% teacher A, 12% teacher B"``; ``None`` for a router without one) and,
        where ``share_weighting="balanced"`` applies, the loss weights per routed teacher (``"rows routed to teacher A
        count x0.53, to teacher B count x10.01 in the student's loss"``; else ``None``)."""
        router = self.router
        shares = router.describe_shares(names) if hasattr(router, "describe_shares") else None
        weights = None
        if self.share_weighting == "balanced" and hasattr(router, "describe_share_weights"):
            weights = router.describe_share_weights(names, self.margin_weighted)
        within = within_teacher_weight(router, self.share_weighting, self.within_teacher_kd)
        if weights and within > 0:
            weights += (f" in the student's loss, plus {within:g} x each teacher matched inside its own classes on "
                        "every row")
        elif weights:
            weights += " in the student's loss"
        return shares, weights

    @property
    def router_unfitted(self) -> bool:
        return self.router is not None and self.router.needs_fit and not self.router.fitted

    def fit_router(self, cache, ids: Sequence[str], certainty_source: Optional[str], limit: Optional[int] = None,
                   seed: int = 0) -> int:
        """Fit the (transductive) router on the pool rows ``ids``; the statistics then follow the new scores."""
        rows = fit_on_pool(self.router, cache, ids, certainty_source, limit, seed)
        self.statistics = None
        return rows

    def fit_statistics(self, cache, ids: Sequence[str], certainty_source: Optional[str]) -> bool:
        """Per-teacher mean and std of the router's (or strategy's) scores over the cached rows ``ids`` (nothing
        to fit without normalization or certainty). Returns whether statistics were fitted."""
        if self.normalization == "none" or certainty_source is None:
            return False
        self.statistics = certainty_statistics(self.route(cache.lookup(ids, certainty_source)).certainty)
        mean, std = self.statistics
        logger.info(f"Certainty standardization ({self.router.name if self.router else certainty_source}): mean "
                    f"{mean.tolist()}, std {std.tolist()} over {len(ids)} training rows.")
        return True
