"""ki-trainer: merge fine-tuned classifiers into one student over the union of their labels, without labels.

The heart is :class:`KnowledgeIntegrationTrainer`, a drop-in ``transformers.Trainer`` whose loss
comes from an ensemble of :class:`Teacher` models integrated by a registered strategy (MUKI by
default: Monte-Carlo-dropout certainty, soft/hard selection, margin re-weighting).
"""

from ._version import __version__
from .checkpoints import CheckpointMismatchError
from .collator import KnowledgeIntegrationCollator
from .config import KnowledgeIntegrationConfig
from .label_space import LabelSpace
from .merge_distill import (
    MaskedLMTeacher,
    MergeDistillConfig,
    MergeDistillTrainer,
    StudentVocabulary,
    build_student,
    select_teachers,
)
from .metrics import integration_metrics
from .querying import TeacherNaNError, mc_dropout_probs, query_teachers
from .routing import Router, build_router, get_router, list_routers, register_router
from .strategies import (
    IntegrationOutput,
    IntegrationStrategy,
    StrategyOptions,
    TeacherSignals,
    get_strategy,
    list_strategies,
    register_strategy,
)
from .signal_cache import CorruptSignalCacheError, StaleSignalCacheError
from .teacher import Teacher
from .trainer import KnowledgeIntegrationTrainer, NonFiniteLossError


__all__ = [
    "CheckpointMismatchError",
    "CorruptSignalCacheError",
    "IntegrationOutput",
    "IntegrationStrategy",
    "KnowledgeIntegrationCollator",
    "KnowledgeIntegrationConfig",
    "KnowledgeIntegrationTrainer",
    "LabelSpace",
    "MaskedLMTeacher",
    "MergeDistillConfig",
    "MergeDistillTrainer",
    "StudentVocabulary",
    "NonFiniteLossError",
    "StaleSignalCacheError",
    "StrategyOptions",
    "Teacher",
    "TeacherNaNError",
    "TeacherSignals",
    "build_student",
    "get_strategy",
    "integration_metrics",
    "list_strategies",
    "mc_dropout_probs",
    "query_teachers",
    "register_strategy",
    "select_teachers",
    "Router",
    "build_router",
    "get_router",
    "list_routers",
    "register_router",
]
