"""The shared base of the transductive (pool) routers: the fit on the unlabeled pool with its guards (too few rows
per teacher falls back to ``entropy``), the label-free estimate of the teachers' shares of the pool, and the
z-scored routers' scoring. The routers themselves are in :mod:`ki_trainer.routing.pool`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import torch
from transformers.utils import logging

from ..strategies.base import TeacherSignals
from .base import Router, build_router
from ..strategies.certainty import margin_weights
from .shares import describe_shares, fit_owner_mixture, owner_logits

logger = logging.get_logger(__name__)

# A transductive fit on fewer pool rows than this per teacher is refused: the router falls back to FALLBACK_ROUTER.
MIN_ROWS_PER_TEACHER = 10
# The fallback needs no fit and reads only the deterministic logits (present in every signal mode).
FALLBACK_ROUTER = "entropy"
SHARES = ("auto", "estimate", "equal")
# shares="auto" (the default) estimates the shares for at most this many teachers. With four teachers on a real pool
# (debian_sections20 4x5, CPU configuration) the estimate was wrong: it read the balanced pool as 41:13:35:11 and
# routed 57.4% of its rows right where the equal-shares z-scores route 71.9% (docs/routing.md, 'Skewed pools').
AUTO_MAX_TEACHERS = 2
# An estimate whose every share lies within MIN_SKEW of 1/teachers routes as equal shares: on the balanced 2x10 pool
# of debian_sections20 the estimate reads 60:40 (docs/routing.md), and a prior that small costs more than it gains.
MIN_SKEW = 0.1


def given_shares(router: str, shares: Any) -> Any:
    """Check a pool router's ``shares`` option: one of :data:`SHARES`, or the pool's teacher shares as the user knows
    them (one positive number per teacher, in the teachers' order; e.g. ``[0.7, 0.2, 0.1]`` or row counts
    ``[7000, 2000, 1000]``), returned as a list of floats that sum to 1."""
    if isinstance(shares, str):
        if shares not in SHARES:
            raise ValueError(f"Router {router!r}: shares must be one of {SHARES} or one positive number per teacher "
                             f"(the pool's known shares, e.g. [0.7, 0.3]), got {shares!r}.")
        return shares
    try:
        values = [float(v) for v in shares]
    except (TypeError, ValueError):
        raise ValueError(f"Router {router!r}: shares must be one of {SHARES} or a list of numbers (one per teacher), "
                         f"got {shares!r}.") from None
    if len(values) < 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"Router {router!r}: given shares must be at least 2 finite positive numbers (one per "
                         f"teacher), got {shares!r}.")
    return [v / sum(values) for v in values]


# ---------------------------------------------------------------------- shared building blocks
def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _features(signals: TeacherSignals) -> list[torch.Tensor]:
    return [f.float() for f in signals.features]


# The z-score is written once, in routing/standardization.py (certainty_normalization uses it too).
from .standardization import zscore as _zscore  # noqa: E402
from .standardization import zscore_fit as _zscore_fit  # noqa: E402


def _probabilities(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(z / temperature, dim=1)


TIE_TOLERANCE = 1e-6  # router scores are probabilities or certainties in [0, 1]


def confident_rows(scores: torch.Tensor, share: float) -> torch.Tensor:
    """A boolean mask of the rows each teacher wins with the largest margins: the top ``share`` of the
    rows routed to each teacher (class-balanced, so a teacher that wins few rows still gets examples).

    A row whose two best scores tie (within ``TIE_TOLERANCE``) is won by no teacher: ``argmax`` would hand
    it to the teacher listed first, so the result would depend on the order of the teachers."""
    route = scores.argmax(1)
    won = torch.ones_like(route, dtype=torch.bool)
    if scores.shape[1] > 1:
        top2 = scores.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        won = margin > TIE_TOLERANCE
    else:
        margin = scores[:, 0]
    keep = torch.zeros_like(route, dtype=torch.bool)
    for t in range(scores.shape[1]):
        mine = (route == t) & won
        if mine.any():
            cut = torch.quantile(margin[mine], 1.0 - share)
            keep |= mine & (margin >= cut)
    return keep


def _pseudo_label_mask(probs: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels and the mask of the most confident ``share`` of the rows of each pseudo-class."""
    confidence, labels = probs.max(1)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    for c in labels.unique():
        mine = labels == c
        keep |= mine & (confidence >= torch.quantile(confidence[mine], 1.0 - share))
    return labels, keep


# Options every pool router takes (see _TransductiveRouter).
_POOL_DEFAULTS: dict[str, Any] = {"shares": "auto", "min_skew": MIN_SKEW, "min_rows_per_teacher": MIN_ROWS_PER_TEACHER}


class _TransductiveRouter(Router):
    """Base for the pool routers: refuses a fit on too small a pool (falls back to a router that needs no fit)
    and keeps the pool's estimated teacher shares.

    Subclasses implement :meth:`_fit` and :meth:`_owner_logits` (``[rows, teachers]`` owner log-odds, the
    quantity combined by ``consensus`` and ``knn_smoothing``); :meth:`score` is their softmax.
    """

    needs_fit = True
    requires = frozenset({"logits"})
    defaults: dict[str, Any] = dict(_POOL_DEFAULTS)

    quiet = False  # a member of a combination: the combination warns about an estimate it uses, not each member

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.options["shares"] = given_shares(self.name, self.options.get("shares", "auto"))
        if not 0.0 <= float(self.options["min_skew"]) < 1.0:
            raise ValueError(f"Router {self.name!r}: min_skew must be in [0, 1).")
        if int(self.options["min_rows_per_teacher"]) < 1:
            raise ValueError(f"Router {self.name!r}: min_rows_per_teacher must be >= 1.")

    # ------------------------------------------------------------------ fit / score
    def fit(self, signals: TeacherSignals) -> "Router":
        self._check(signals, fitting=True)
        self.state = {}
        rows, teachers = signals.batch_size, len(signals.logits)
        minimum = int(self.options["min_rows_per_teacher"]) * teachers
        if rows < minimum:
            message = (f"Router {self.name!r} was given {rows} pool row(s) to fit on; it needs at least {minimum} "
                       f"({self.options['min_rows_per_teacher']} per teacher x {teachers} teachers). Routing by "
                       f"{FALLBACK_ROUTER!r} instead, which needs no fit (give the router more unlabeled rows, "
                       "e.g. a larger train_dataset or router_fit_rows).")
            if not isinstance(self.options.get("shares"), str):
                message += " The shares given in router_options are not used."
            warnings.warn(message, stacklevel=2)
            logger.warning(message)
            self.state = {"fallback": FALLBACK_ROUTER, "fit_rows": rows, "min_rows": minimum}
        else:
            self._fit(signals)
            self.state["fit_rows"] = rows
        self.fitted = True
        if not self.fallback:
            self._fit_share_weights(signals)
        return self

    def _fit_share_weights(self, signals: TeacherSignals) -> None:
        """On a pool whose shares (estimated or given) are skewed: per-teacher loss weights under which every
        teacher's routed pool rows carry the same total loss weight, and the pool's total is unchanged.
        ``share_weights``: for a strategy that weights each row by its margin (MUKI's default), ``total margin /
        (teachers x margin of the rows routed to the teacher)``; ``share_weights_rows``: for one that does not,
        ``rows / (teachers x rows routed to it)``. (A minority teacher's rows also have smaller margins: the prior
        pulls them towards a tie.)"""
        if not self.skewed:
            return
        scores = self.score(signals).float().cpu()
        routed = _routed(scores)
        for key, mass in (("share_weights", routed * margin_weights(scores)[:, None]), ("share_weights_rows", routed)):
            per_teacher = mass.sum(0)
            owning = per_teacher > 0
            weights = torch.ones(len(per_teacher))
            weights[owning] = per_teacher.sum() / (int(owning.sum()) * per_teacher[owning])
            self.state[key] = weights

    def describe_share_weights(self, names: Optional[Sequence[str]] = None, margin_weighted: bool = True
                               ) -> Optional[str]:
        """``"rows routed to teacher A count x0.53, to teacher B count x10.01"`` (the ``share_weighting="balanced"`` loss
        weights, see :meth:`row_weights`), or ``None`` when no share estimate is in use."""
        weights = self.state.get("share_weights" if margin_weighted else "share_weights_rows")
        if weights is None:
            return None
        values = torch.as_tensor(weights).tolist()
        names = list(names) if names is not None else [str(t) for t in range(len(values))]
        return "rows routed to " + ", to ".join(f"teacher {n} count x{v:.2f}" for n, v in zip(names, values))

    def row_weights(self, scores: torch.Tensor, margin_weighted: bool = True) -> Optional[torch.Tensor]:
        """``[rows]`` loss weights that make every teacher's domain count alike on a skewed pool: the weight of the
        teacher each row is routed to (the best of ``scores``, from :meth:`score`; exact ties share). Without margin
        weighting (``margin_weighted=False``) a teacher's weight is ``rows / (teachers x pool rows routed to it)``, so
        that a teacher owning 10% of the pool has its rows counted 5 times and one owning 90% 0.56 times; with it
        (MUKI's margin re-weighting) the same with each row counted by its margin. ``None`` when no share estimate is
        in use (balanced pool, ``shares="equal"``, no clear owner structure, a fall-back): every row then counts 1."""
        weights = self.state.get("share_weights" if margin_weighted else "share_weights_rows")
        if weights is None:
            return None
        return _routed(scores.float()) @ torch.as_tensor(weights).to(scores.device, torch.float32)

    def _fit(self, signals: TeacherSignals) -> None:
        raise NotImplementedError

    def _owner_logits(self, signals: TeacherSignals) -> torch.Tensor:
        raise NotImplementedError

    @property
    def fallback(self) -> Optional[str]:
        """The router scoring in this one's place when the pool was too small to fit on, else ``None``."""
        return self.state.get("fallback")

    def owner_logits(self, signals: TeacherSignals) -> torch.Tensor:
        """``[rows, teachers]`` owner log-odds (a teacher's estimated pool share included), higher = more competent."""
        self._check(signals)
        if self.fallback:
            return build_router(self.fallback).score(signals)
        return self._owner_logits(signals)

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        self._check(signals)  # unfitted, or signals without what the fit read: one clear message
        if self.fallback:
            return build_router(self.fallback).score(signals)
        return _probabilities(self._owner_logits(signals), self.options.get("temperature", 1.0))

    # ------------------------------------------------------------------ the pool's teacher shares
    @property
    def shares(self) -> Optional[torch.Tensor]:
        """The pool's estimated teacher shares (``[teachers]``, sums to 1), or ``None`` when none was estimated
        (``shares="equal"``, a fall-back, or scores without a clear owner structure: see ``shares_note``)."""
        shares = self.state.get("shares")
        return None if shares is None else torch.as_tensor(shares)

    @property
    def shares_note(self) -> Optional[str]:
        """Why no share estimate is used, when none is."""
        return self.state.get("shares_note")

    def describe_shares(self, names: Optional[Sequence[str]] = None) -> str:
        """One line for the log and the model card: ``"the pool looks 88% teacher A, 12% teacher B"``."""
        if self.fallback:
            return (f"not estimated: {self.state['fit_rows']} pool row(s) seen, {self.state['min_rows']} needed; "
                    f"routed by {self.fallback!r}")
        if self.state.get("shares_given"):
            return describe_shares(self.shares.tolist(), names, verb="is") + " (as given: router_options shares)"
        if self.shares is not None:
            line = describe_shares(self.shares.tolist(), names)
            if not self.uses_shares:
                line += f" (within {self.options['min_skew']:g} of equal shares: routed as equal shares)"
            return line
        return f"not estimated ({self.shares_note or 'equal shares assumed'})"

    @property
    def uses_shares(self) -> bool:
        """Whether the pool's shares are the routing prior: shares given by the user always; an estimate when it lies
        far enough (``min_skew``) from equal shares."""
        return self.shares is not None and (bool(self.state.get("shares_given")) or self.skewed)

    @property
    def skewed(self) -> bool:
        """Whether the pool's shares (estimated or given) lie at least ``min_skew`` from equal shares: where
        ``share_weighting="balanced"`` and the automatic ``within_teacher_kd`` apply."""
        shares = self.shares
        if shares is None:
            return False
        return bool((shares - 1.0 / len(shares)).abs().max() >= float(self.options.get("min_skew", MIN_SKEW)))

    def check_teachers(self, count: int) -> None:
        """Refuse given shares (``router_options={"shares": [...]}``) whose length is not the number of teachers, before
        any teacher runs."""
        shares = self.options.get("shares")
        if not isinstance(shares, str) and len(shares) != count:
            raise ValueError(f"Router {self.name!r}: {len(shares)} shares given for {count} teachers; give one per "
                             "teacher, in the teachers' order.")

    def _log_shares(self) -> None:
        if self.uses_shares and not self.state.get("shares_given") and not self.quiet:  # an estimate steers routing
            logger.warning(f"Router {self.name!r}: {self.describe_shares()}, estimated label-free and used as the "
                           "routing prior. The estimate can misread a pool (docs/routing.md, 'Skewed pools'): if you "
                           "know how many rows of each teacher's domain the pool holds, give them as "
                           "router_options={'shares': [...]}.")
        else:
            logger.info(f"Router {self.name!r}: {self.describe_shares()}.")


def _routed(scores: torch.Tensor) -> torch.Tensor:
    """``[rows, teachers]`` one-hot of each row's best teacher (exact ties split evenly: no dependence on the order)."""
    top = (scores == scores.max(1, keepdim=True).values).float()
    return top / top.sum(1, keepdim=True)


def _set_shares(router: _TransductiveRouter, mixture: Optional[dict[str, Any]], note: str = "") -> None:
    """Record a share estimate (or why there is none) in ``router.state``."""
    if mixture is not None and mixture["accepted"]:
        router.state["shares"] = mixture["shares"]
    else:
        router.state["shares_note"] = note or (mixture["reason"] if mixture is not None else "equal shares assumed")
    router._log_shares()


def _set_given_shares(router: _TransductiveRouter, shares: Sequence[float], teachers: int) -> None:
    """Record the shares the user gave (``router_options={"shares": [...]}``) as the routing prior."""
    router.check_teachers(teachers)
    router.state["shares"] = torch.tensor(shares, dtype=torch.float32)
    router.state["shares_given"] = True
    router._log_shares()


class _ZScoredRouter(_TransductiveRouter):
    """Base for pool routers with one raw score per teacher, calibrated on the pool and softmaxed.

    ``shares="estimate"``: the pool is modelled as a mixture of owners (:mod:`ki_trainer.routing.shares`);
    each teacher's raw score is calibrated against its own in- and out-of-domain rows and the estimated shares
    are the prior. ``shares="equal"``: each teacher's raw score z-scored over the whole pool (assumes every
    teacher owns the same share of the pool; the behaviour before the estimate existed). ``shares="auto"``
    (default): ``"estimate"`` for two teachers, ``"equal"`` for more (where the estimate was measured wrong).
    A list of numbers (``[0.7, 0.2, 0.1]``, or row counts): the pool's shares as the user knows them (e.g. how many
    rows of each teacher's domain went into the pool), used as the prior instead of an estimate.
    """

    def raw_fit(self, signals: TeacherSignals) -> None:  # fit what raw_score needs
        pass

    def raw_score(self, signals: TeacherSignals) -> torch.Tensor:
        raise NotImplementedError

    def _fit(self, signals: TeacherSignals) -> None:
        self.raw_fit(signals)
        raw = self.raw_score(signals)
        self.state["zscore"] = _zscore_fit(raw)
        mode = self.options.get("shares", "auto")
        if not isinstance(mode, str):
            _set_given_shares(self, mode, raw.shape[1])
        elif mode == "auto" and raw.shape[1] > AUTO_MAX_TEACHERS:
            _set_shares(self, None, f"estimated for up to {AUTO_MAX_TEACHERS} teachers by default; with "
                        f"{raw.shape[1]} the estimate misread a balanced real pool, so equal shares are assumed "
                        "(router_options shares='estimate' estimates anyway)")
        elif mode in ("auto", "estimate"):
            _set_shares(self, fit_owner_mixture(_zscore(raw, self.state["zscore"])))
        else:
            _set_shares(self, None, "shares='equal'")

    def zscores(self, signals: TeacherSignals) -> torch.Tensor:
        """Each teacher's raw score z-scored over the pool (the equal-shares calibration)."""
        self._check(signals)
        return _zscore(self.raw_score(signals), self.state["zscore"])

    def _owner_logits(self, signals: TeacherSignals) -> torch.Tensor:
        if self.uses_shares:
            return owner_logits(self.zscores(signals), self.shares)
        return self.zscores(signals)
