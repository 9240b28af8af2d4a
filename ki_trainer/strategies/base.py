"""The interface every integration strategy implements, and the registry that names them.

An integration strategy turns the teachers' signals for a batch into a training loss for the
student. Adding a strategy means adding one subclass decorated with :func:`register_strategy`;
the trainer, config validation and ``list_strategies()`` pick it up from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from ..label_space import LabelSpace


@dataclass
class TeacherSignals:
    """What the teachers say about one batch.

    Attributes:
        logits: one ``[B, C_t]`` tensor per teacher: deterministic (eval-mode) logits, fp32.
        certainty: ``[B, N]`` competence scores the strategy selects and weights teachers by: MUKI's
            certainty ``1 - H(p)/log C_t`` in [0, 1], or the scores of the configured router; ``None``
            when the strategy does not use them.
        mutual_information: ``[B, N]`` MC mutual information (BALD, normalised by ``log C_t``), when
            Monte-Carlo passes were run.
        top_variance: ``[B, N]`` variance over MC passes of the top-class probability, when run.
        features: one ``[B, D_t]`` pooled-feature tensor per teacher (input of its output layer), when
            requested.
        row_weights: ``[B]`` loss weights from the router's estimate of the pool's teacher shares
            (``share_weighting="balanced"`` on a skewed pool: each row divided by its routed teacher's share, mean 1
            over the pool), multiplied into the certainty strategies' per-example loss; ``None``: every row 1.
        within_teacher_weight: the multiple of UHC's loss (each teacher matched inside its own classes on every row)
            the certainty strategies add, as resolved for this pool (config ``within_teacher_kd``); ``None``: the
            strategy's own ``StrategyOptions.within_teacher_weight``.
    """

    logits: list[torch.Tensor]
    certainty: Optional[torch.Tensor] = None
    mutual_information: Optional[torch.Tensor] = None
    top_variance: Optional[torch.Tensor] = None
    features: Optional[list[torch.Tensor]] = None
    row_weights: Optional[torch.Tensor] = None
    within_teacher_weight: Optional[float] = None

    @property
    def batch_size(self) -> int:
        return self.logits[0].shape[0]


@dataclass
class StrategyOptions:
    """Hyper-parameters shared by the strategies (each strategy reads the ones it needs)."""

    temperature: float = 1.0
    selection: str = "soft"
    score_temperature: float = 0.2
    margin_reweighting: bool = True
    normalize_weights: bool = False
    within_teacher_weight: float = 0.0


@dataclass
class IntegrationOutput:
    """A strategy's result for one batch.

    Attributes:
        loss: scalar fp32 training loss (already weighted and averaged over the batch).
        divergence: ``[B]`` unweighted per-example divergence (for logging).
        weights: ``[B]`` margin weights applied, or ``None`` (``signals.row_weights``, when given, multiply the
            loss as well).
        selected: ``[B]`` index of the most certain teacher, or ``None``.
        target: ``[B, C]`` union-space target distribution, for strategies that build one (else ``None``).
    """

    loss: torch.Tensor
    divergence: torch.Tensor
    weights: Optional[torch.Tensor] = None
    selected: Optional[torch.Tensor] = None
    target: Optional[torch.Tensor] = None


class IntegrationStrategy:
    """Base class. Subclasses set ``name``, ``certainty_source`` and implement :meth:`compute`.

    ``certainty_source`` tells the trainer which teacher signals to produce:
    ``None`` (logits only), ``"deterministic"`` (certainty from the eval-mode pass) or ``"mc"``
    (certainty from the mean of K Monte-Carlo-dropout passes). Strategies that select teachers by
    competence set ``default_router``; any registered router (``ki_trainer.list_routers()``) can then
    replace it through the config's ``router`` field.
    """

    name: ClassVar[str] = ""
    certainty_source: ClassVar[Optional[str]] = None
    #: the router (competence estimator) whose scores fill ``signals.certainty`` when the config names
    #: none; ``None`` for strategies that do not select teachers by competence.
    default_router: ClassVar[Optional[str]] = None
    #: the default router when the teacher signals are cached (``signal_source="cached"``), where a
    #: transductive router can be fitted on the whole unlabeled pool first; ``None``: ``default_router``.
    cached_default_router: ClassVar[Optional[str]] = None

    def __init__(self, label_space: LabelSpace, options: Optional[StrategyOptions] = None) -> None:
        self.label_space = label_space
        self.options = options or StrategyOptions()

    def compute(self, student_logits: torch.Tensor, signals: TeacherSignals) -> IntegrationOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, options={self.options})"


STRATEGIES: dict[str, type[IntegrationStrategy]] = {}


def register_strategy(cls: type[IntegrationStrategy]) -> type[IntegrationStrategy]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name` to be registered.")
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"A strategy named {cls.name!r} is already registered ({STRATEGIES[cls.name].__name__}).")
    STRATEGIES[cls.name] = cls
    return cls


def list_strategies() -> list[str]:
    """Names of all registered integration strategies."""
    return sorted(STRATEGIES)


def get_strategy(name: str) -> type[IntegrationStrategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"Unknown integration strategy {name!r}; available: {list_strategies()}.") from None
