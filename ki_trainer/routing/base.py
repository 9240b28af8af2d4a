"""The interface every competence estimator ("router") implements, and the registry that names them.

When several teachers each own a block of the union's labels, a label-free student can only be as
good as the per-example decision of WHICH teacher is competent on the example. A router turns what
the teachers say about a set of unlabeled rows (:class:`~ki_trainer.strategies.TeacherSignals`:
deterministic logits, Monte-Carlo statistics, pooled features) into a ``[rows, teachers]``
competence score; the certainty-based strategies (``muki``, ``entropy``) select or mix the teachers
by it and weight each example by the margin between its two best scores.

Scores are on a common scale in [0, 1], higher = more competent, so that ``selection="soft"``
(``softmax(score / teacher_score_temperature)``) and margin re-weighting (top-1 minus top-2) mean the
same thing for every router: either a certainty (MUKI's ``1 - H/log C``, the published default) or a
probability over teachers (the transductive routers).

Routers never see gold labels. A *transductive* router (``needs_fit = True``) is fitted once on the
whole unlabeled pool before training (``KnowledgeIntegrationTrainer.fit_router``); its state is a
dict of tensors and plain values, saved next to the model and in every checkpoint so that
evaluation and resume use the same fit. Adding a router is adding one subclass decorated with
:func:`register_router`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch

from ..strategies.base import TeacherSignals

SIGNAL_KINDS = ("logits", "mc", "features")


class Router:
    """Base class. Subclasses set ``name``, ``requires`` (a subset of ``SIGNAL_KINDS``) and implement
    :meth:`score` (and :meth:`fit` when ``needs_fit``).

    Attributes:
        name: registry name (``router="..."`` in the config).
        requires: the teacher signals the router reads: ``"logits"`` (one deterministic pass),
            ``"mc"`` (K Monte-Carlo-dropout passes: MC certainty, mutual information, variance),
            ``"features"`` (each teacher's pooled features).
        needs_fit: a transductive router that must be fitted on the unlabeled pool first.
        defaults: hyper-parameters and their default values (overridable with ``router_options``).
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset({"logits"})
    needs_fit: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"Router {self.name!r} has no option(s) {unknown}; it takes {sorted(self.defaults) or 'none'}."
            )
        self.options: dict[str, Any] = {**self.defaults, **options}
        self.state: dict[str, Any] = {}
        self.fitted = not self.needs_fit

    # ------------------------------------------------------------------ the interface
    def fit(self, signals: TeacherSignals) -> "Router":
        """Fit on the whole unlabeled pool (label-free). The default does nothing."""
        self._check(signals, fitting=True)
        self.fitted = True
        return self

    def check_teachers(self, count: int) -> None:
        """Refuse options that do not fit ``count`` teachers (called when the trainer is built, before any teacher
        runs); nothing to check by default."""

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        """``[rows, teachers]`` competence in [0, 1], higher = more competent (fp32)."""
        raise NotImplementedError

    def pool_scores(self) -> Optional[torch.Tensor]:
        """The scores of the rows :meth:`fit` saw, in that order (transductive routers), else ``None``."""
        return self.state.get("pool_scores")

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options), "fitted": self.fitted,
                "state": {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> "Router":
        if state.get("name") != self.name:
            raise ValueError(f"Router state is for {state.get('name')!r}, not {self.name!r}.")
        self.options = {**self.defaults, **state.get("options", {})}
        self.state = dict(state.get("state", {}))
        self.fitted = bool(state.get("fitted", True))
        return self

    # ------------------------------------------------------------------ helpers
    def _check(self, signals: TeacherSignals, fitting: bool = False) -> None:
        """The signals carry what the router reads; a transductive router is fitted (unless ``fitting``)."""
        missing = []
        if "mc" in self.requires and (signals.certainty is None or signals.mutual_information is None):
            missing.append("Monte-Carlo statistics")
        if "features" in self.requires and signals.features is None:
            missing.append("pooled teacher features")
        if missing:
            raise ValueError(f"Router {self.name!r} needs {' and '.join(missing)}; the signals carry none.")
        if self.needs_fit and not self.fitted and not fitting:
            raise RuntimeError(
                f"Router {self.name!r} is transductive: fit it on the unlabeled pool first "
                "(KnowledgeIntegrationTrainer.fit_router(), called by train() with signal_source='cached')."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, options={self.options})"


ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name` to be registered.")
    if cls.name in ROUTERS and ROUTERS[cls.name] is not cls:
        raise ValueError(f"A router named {cls.name!r} is already registered ({ROUTERS[cls.name].__name__}).")
    unknown = set(cls.requires) - set(SIGNAL_KINDS)
    if unknown:
        raise ValueError(f"{cls.__name__}.requires has unknown signal kinds {sorted(unknown)}; use {SIGNAL_KINDS}.")
    ROUTERS[cls.name] = cls
    return cls


def list_routers() -> list[str]:
    """Names of all registered routers."""
    return sorted(ROUTERS)


def get_router(name: str) -> type[Router]:
    try:
        return ROUTERS[name]
    except KeyError:
        raise ValueError(f"Unknown router {name!r}; available: {list_routers()}.") from None


def build_router(name: str, options: Optional[dict[str, Any]] = None) -> Router:
    return get_router(name)(**(options or {}))
