"""``KnowledgeIntegrationConfig``: ``TrainingArguments`` plus the knobs of knowledge integration."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from transformers import TrainingArguments

from ._deprecation import renamed_field
from .routing import get_router, list_routers
from .signal_cache.fingerprint import cache_directory
from .strategies import StrategyOptions, get_strategy, list_strategies

STUDENT_INITS = ("pretrained", "teacher_average", "teacher_average_encoder")

TEACHER_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_teacher_dtype(args: TrainingArguments) -> torch.dtype:
    """The dtype teachers are cast to (``args.teacher_dtype``): the explicit choice, else the mixed-precision dtype
    (bf16; fp16 off the CPU), else fp32. Shared by the knowledge-integration and MergeDistill configs."""
    explicit = TEACHER_DTYPES[args.teacher_dtype]
    if explicit is not None:
        return explicit
    if args.bf16:
        return torch.bfloat16
    if args.fp16 and not args.use_cpu:
        return torch.float16
    return torch.float32


# Float fields where +inf has a meaning (no gradient clipping); NaN is never valid anywhere.
_INFINITY_ALLOWED = frozenset({"max_grad_norm"})


def check_finite_fields(args) -> None:
    """Reject NaN (anywhere) and +-inf (except where it has a meaning) in every float field.

    A NaN temperature passes ``<= 0`` checks and turns every student weight into NaN while the
    Trainer logs the loss as 0.0: it must fail here, by name.
    """
    for f in dataclasses.fields(args):
        value = getattr(args, f.name, None)
        if not isinstance(value, float) or math.isfinite(value):
            continue
        if math.isinf(value) and value > 0 and f.name in _INFINITY_ALLOWED:
            continue
        raise ValueError(f"{f.name} must be a finite number, got {value}.")


_SCALAR_TYPES = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,)}


def _scalar_annotation(annotation: Any) -> tuple[Optional[str], bool]:
    """``("int" | "float" | "bool" | None, None allowed)`` for a dataclass field annotation (string or type)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace("<class '", "").replace("'>", "").replace(" ", "")
    optional = False
    if text.startswith("Optional[") and text.endswith("]"):
        text, optional = text[len("Optional["):-1], True
    elif text.endswith("|None"):
        text, optional = text[: -len("|None")], True
    return (text if text in _SCALAR_TYPES else None), optional


def check_field_types(args) -> None:
    """Reject a number or boolean field given a value of another type: ``max_steps=True`` would run 1 step,
    ``mc_samples=2.5`` fail deep in a forward, ``margin_reweighting="no"`` be true. Python does not check
    dataclass annotations; ``HfArgumentParser`` converts command-line strings before they get here."""
    for f in dataclasses.fields(args):
        kind, _ = _scalar_annotation(f.type)
        value = getattr(args, f.name, None)
        # None is left to the fields' own checks: HfArgumentParser strips Optional[...] from the shared field
        # objects, so whether a field allows None cannot be read reliably here.
        if kind is None or value is None or value is f.default or not f.init:
            continue
        is_bool = isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")  # numpy's too
        if (is_bool != (kind == "bool")) or (kind != "bool" and not isinstance(value, _SCALAR_TYPES[kind])):
            expected = {"int": "an integer", "float": "a number", "bool": "True or False"}[kind]
            raise TypeError(f"{f.name} must be {expected}, got {type(value).__name__} {value!r}.")


@dataclass
class KnowledgeIntegrationConfig(TrainingArguments):
    """Training arguments for :class:`~ki_trainer.KnowledgeIntegrationTrainer`.

    Every ``TrainingArguments`` field works as usual (batch size, learning rate, ``bf16``,
    ``report_to``, checkpointing, ``push_to_hub`` ...). The fields below configure how the teachers
    are queried and how their predictions are integrated. All of them can be given on the command
    line through ``HfArgumentParser``.
    """

    strategy: str = field(
        default="muki",
        metadata={"help": f"Integration strategy, one of {list_strategies()}."},
    )
    selection: str = field(
        default="soft",
        metadata={
            "help": "For certainty-based strategies (muki, entropy): 'hard' takes the most certain teacher's "
            "prediction, 'soft' mixes the teachers by softmax(certainty / teacher_score_temperature).",
            "choices": ["hard", "soft"],
        },
    )
    router: Optional[str] = field(
        default=None,
        metadata={
            "help": f"Competence estimator that scores each teacher on each example for the certainty-based "
            f"strategies, one of {list_routers()}. Default for muki: 'relative_mahalanobis' with "
            "signal_source='cached' (fitted label-free on the whole unlabeled pool; it routes better than MC "
            "entropy on every split measured), 'mc_entropy' (MUKI as published) on the fly; "
            "set router='mc_entropy' for the published recipe with cached signals. entropy: 'entropy'. "
            "Transductive routers need signal_source='cached'. See docs/routing.md."
        },
    )
    router_options: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "Router hyper-parameters as a dict or JSON text, e.g. '{\"neighbours\": 10}'. Pool routers "
                  "take 'shares': 'auto' (default: estimated for two teachers, equal for more), 'estimate', 'equal', "
                  "or the pool's teacher shares when you know them (one number per teacher, e.g. [0.7, 0.3] or row "
                  "counts), used as the routing prior."},
    )
    router_fit_rows: Optional[int] = field(
        default=None,
        metadata={
            "help": "Fit a transductive router on at most this many pool rows, drawn at random (seeded by `seed`; "
            "label-free). Default: every row. Bounds the fit's memory and time on very large pools; how routing "
            "accuracy depends on it is measured in docs/routing.md ('Pool size')."
        },
    )
    share_weighting: str = field(
        default="balanced",
        metadata={
            "help": "For pool routers that estimate the pool's teacher shares (label-free; docs/routing.md, "
            "'Skewed pools') or are given them (router_options shares), when the pool looks skewed: 'balanced' "
            "weights each row's loss by the teacher it is routed to, so that every teacher's routed rows carry the "
            "same total loss weight (counted with their margin weights under margin_reweighting; the pool's total "
            "is unchanged) and the student does not forget a minority teacher's classes; 'pool' lets every row "
            "count the same, so the student learns the pool's own mix of teachers (right when the text it will "
            "predict on is mixed like the pool). No effect on a balanced pool, with router_options "
            "shares='equal', or without a pool router.",
            "choices": ["balanced", "pool"],
        },
    )
    within_teacher_kd: Optional[float] = field(
        default=None,
        metadata={
            "help": "For the certainty-based strategies (muki, entropy): add this multiple of UHC's loss, in which "
            "the student, renormalised inside each teacher's classes, matches that teacher on every row (whichever "
            "teacher the row is routed to). Each teacher's ranking of its own classes is then learned from the whole "
            "pool, not only from the rows routed to it; a teacher that owns few pool rows (a skewed pool) gains most. "
            "None (default): 1.0 where share_weighting='balanced' applies (a pool router found the pool skewed), "
            "else 0 (MUKI's loss alone). See docs/routing.md, 'Skewed pools'."
        },
    )
    mc_samples: int = field(
        default=16,
        metadata={"help": "Monte-Carlo dropout passes per teacher and example used to score certainty (muki)."},
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature of teacher targets and student; losses are scaled by T^2."},
    )
    teacher_score_temperature: float = field(
        default=0.2,
        metadata={"help": "Temperature T_s of the softmax over teacher certainties in soft selection."},
    )
    certainty_normalization: str = field(
        default="none",
        metadata={
            "help": "'standardize' rescales each teacher's certainty to zero mean and unit variance over the "
            "training rows before teachers are compared (label-free). Teachers of different architectures, sizes "
            "or languages are calibrated differently, so raw certainties can favour one teacher everywhere; "
            "standardizing compares each teacher with itself. Needs signal_source='cached'.",
            "choices": ["none", "standardize"],
        },
    )
    margin_reweighting: bool = field(
        default=True,
        metadata={"help": "Weight each example by the margin between the top-2 teacher certainties."},
    )
    normalize_margin_weights: bool = field(
        default=False,
        metadata={
            "help": "Divide the margin weights by their batch mean (keeps the effective learning rate). "
            "The MUKI authors do not; off by default."
        },
    )
    student_init: str = field(
        default="pretrained",
        metadata={
            "help": "How the student's weights start: 'pretrained' (the student checkpoint as given), "
            "'teacher_average' (average the teachers' weights and stack their output layers over the union labels) or "
            "'teacher_average_encoder' (average every weight but the output layer, which stays the student's fresh "
            "one). Both need full-model teachers fine-tuned from the student's base checkpoint, with its vocabulary. "
            "When each helps is measured in docs/guide.md and docs/routing.md.",
            "choices": list(STUDENT_INITS),
        },
    )
    text_column: str = field(default="text", metadata={"help": "Dataset column holding the raw text."})
    label_column: str = field(
        default="label",
        metadata={"help": "Dataset column with gold labels (names or union ids). Used for evaluation ONLY."},
    )
    max_length: Optional[int] = field(
        default=None,
        metadata={
            "help": "Truncation length for the student and the teachers (default: the smaller of each model's "
            "position limit and its tokenizer's model_max_length)."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "Precision teachers are held in: 'auto' follows bf16/fp16 mixed precision, else float32.",
            "choices": list(TEACHER_DTYPES),
        },
    )
    mc_chunk_size: int = field(
        default=512,
        metadata={
            "help": "Maximum rows (examples x mc_samples) per teacher forward during MC dropout; bounds memory."
        },
    )
    mc_top_layers: Optional[int] = field(
        default=None,
        metadata={
            "help": "Sample dropout only in each teacher's last m transformer layers (and head); the lower layers "
            "run once and are shared by the K samples. Faster; changes the certainty estimate (measure it)."
        },
    )
    signal_source: str = field(
        default="on_the_fly",
        metadata={
            "help": "Where the teachers' signals come from. 'on_the_fly' queries the teachers every step (fresh MC "
            "samples each epoch); 'cached' computes each training example's signals once, keyed by example id, and "
            "reuses them across epochs, runs and strategies (evaluation sets with ids too, one cache file per "
            "metric_key_prefix).",
            "choices": ["on_the_fly", "cached"],
        },
    )
    teacher_signals: Optional[str] = field(
        default=None,
        metadata={
            "help": "Deprecated name of signal_source (same values): still accepted, with a FutureWarning.",
            "choices": ["on_the_fly", "cached"],
        },
    )
    signal_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where cached teacher signals live (default: <output_dir>/teacher_signals)."},
    )
    id_column: str = field(
        default="id",
        metadata={"help": "Dataset column with unique example ids (needed for cached teacher signals)."},
    )
    check_teacher_outputs: bool = field(
        default=True,
        metadata={
            "help": "Raise if a teacher returns NaN/inf logits. Costs one device sync per step; "
            "disable for peak throughput once your teachers are known to be sane."
        },
    )

    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "For a PEFT (LoRA) student: save_model() and push_to_hub() write the merged plain model "
            "(merge_and_unload on a copy; training keeps the adapter) instead of the adapter. Checkpoints keep "
            "the adapter."
        },
    )

    def __post_init__(self) -> None:
        renamed_field(self, "teacher_signals", "signal_source", default="on_the_fly")  # the earlier name, warned
        check_field_types(self)
        check_finite_fields(self)
        super().__post_init__()
        strategy = get_strategy(self.strategy)  # raises with the list of known strategies
        if self.selection not in ("hard", "soft"):
            raise ValueError(f"selection must be 'hard' or 'soft', got {self.selection!r}.")
        if self.student_init not in STUDENT_INITS:
            raise ValueError(f"student_init must be one of {list(STUDENT_INITS)}, got {self.student_init!r}.")
        self._validate_router()
        if self.share_weighting not in ("balanced", "pool"):
            raise ValueError(f"share_weighting must be 'balanced' or 'pool', got {self.share_weighting!r}.")
        if self.router_fit_rows is not None and self.router_fit_rows < 2:
            raise ValueError(f"router_fit_rows must be >= 2 (or None for every pool row), got {self.router_fit_rows}.")
        if self.within_teacher_kd is not None and not self.within_teacher_kd >= 0:
            raise ValueError(f"within_teacher_kd must be >= 0 (or None), got {self.within_teacher_kd}.")
        if self.mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {self.mc_samples}.")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}.")
        if self.teacher_score_temperature <= 0:
            raise ValueError(f"teacher_score_temperature must be > 0, got {self.teacher_score_temperature}.")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {list(TEACHER_DTYPES)}, got {self.teacher_dtype!r}.")
        if self.mc_chunk_size < 1:
            raise ValueError(f"mc_chunk_size must be >= 1, got {self.mc_chunk_size}.")
        if self.mc_top_layers is not None and self.mc_top_layers < 1:
            raise ValueError(f"mc_top_layers must be >= 1 or None, got {self.mc_top_layers}.")
        if self.signal_source not in ("on_the_fly", "cached"):
            raise ValueError(f"signal_source must be 'on_the_fly' or 'cached', got {self.signal_source!r}.")
        if self.certainty_normalization not in ("none", "standardize"):
            raise ValueError(
                f"certainty_normalization must be 'none' or 'standardize', got {self.certainty_normalization!r}."
            )
        if self.certainty_normalization == "standardize" and not self.signals_are_cached:
            raise ValueError(
                "certainty_normalization='standardize' needs every training row's certainty before training starts: "
                "set signal_source='cached'."
            )
        if self.certainty_normalization != "none" and strategy.certainty_source is None:
            raise ValueError(
                f"certainty_normalization={self.certainty_normalization!r} rescales teacher certainty, but strategy "
                f"{self.strategy!r} uses none; set certainty_normalization='none' or a certainty strategy "
                "(muki, entropy)."
            )
        if self.within_teacher_kd and strategy.certainty_source is None:
            raise ValueError(f"within_teacher_kd adds UHC's loss to a certainty-based strategy (muki, entropy); "
                             f"strategy {self.strategy!r} does not take it (use strategy='uhc' for UHC alone).")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}.")

    def _validate_router(self) -> None:
        if isinstance(self.router_options, str):
            try:
                self.router_options = json.loads(self.router_options) if self.router_options.strip() else None
            except json.JSONDecodeError as error:
                raise ValueError(f"router_options must be a JSON object, got {self.router_options!r}: {error}") from None
        if self.router_options is not None and not isinstance(self.router_options, dict):
            raise ValueError(f"router_options must be a dict (or JSON object text), got {type(self.router_options).__name__}.")
        strategy = get_strategy(self.strategy)
        if self.router is None:
            if self.router_options:
                raise ValueError("router_options given without a router: set router= as well.")
            return
        router_cls = get_router(self.router)  # raises with the list of known routers
        if strategy.default_router is None:
            raise ValueError(
                f"router={self.router!r} has no effect with strategy={self.strategy!r}, which does not select teachers "
                "by competence; use strategy='muki' (or 'entropy') with a router."
            )
        router_cls(**(self.router_options or {}))  # unknown options fail here, not after precomputing
        if router_cls.needs_fit and not self.signals_are_cached:
            raise ValueError(
                f"router={self.router!r} is fitted on the whole unlabeled pool before training: set "
                "signal_source='cached'."
            )

    # ------------------------------------------------------------------ helpers
    @property
    def signals_are_cached(self) -> bool:
        """Whether the teachers' signals are precomputed once and read from the signal cache."""
        return self.signal_source == "cached"

    def resolved_signal_cache_dir(self) -> str:
        """Where cached teacher signals live: ``signal_cache_dir``, else ``<output_dir>/teacher_signals``."""
        return cache_directory(self.signal_cache_dir, self.output_dir)

    def resolved_router(self) -> Optional[str]:
        """The router in use: the configured one, else the strategy's default (``None`` for strategies without one).

        ``muki``'s default depends on the signal mode: with ``signal_source="cached"`` the
        ``relative_mahalanobis`` router (fitted label-free on the pool); on the fly, MUKI's published Monte-Carlo
        entropy (``mc_entropy``), since a transductive router needs every pool row's signals first.
        """
        if self.router:
            return self.router
        strategy = get_strategy(self.strategy)
        if self.signals_are_cached and strategy.cached_default_router:
            return strategy.cached_default_router
        return strategy.default_router

    def router_kwargs(self) -> dict[str, Any]:
        return dict(self.router_options or {})

    def strategy_options(self) -> StrategyOptions:
        return StrategyOptions(
            temperature=self.kd_temperature,
            selection=self.selection,
            score_temperature=self.teacher_score_temperature,
            margin_reweighting=self.margin_reweighting,
            normalize_weights=self.normalize_margin_weights,
            within_teacher_weight=float(self.within_teacher_kd or 0.0),
        )

    def resolved_teacher_dtype(self) -> torch.dtype:
        """The dtype teachers are cast to: explicit choice, else the mixed-precision dtype, else fp32."""
        return resolve_teacher_dtype(self)

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **overrides) -> "KnowledgeIntegrationConfig":
        """Upgrade plain ``TrainingArguments`` (from an existing script) with default KI settings."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and hasattr(args, f.name)}
        values.update(overrides)
        return cls(**values)
