"""ki-trainer: merge fine-tuned classifiers into one student over the union of their labels, without labels.

The heart is :class:`KnowledgeIntegrationTrainer`, a drop-in ``transformers.Trainer`` whose loss
comes from an ensemble of :class:`Teacher` models integrated by a registered strategy (MUKI by
default: Monte-Carlo-dropout certainty, soft/hard selection, margin re-weighting).
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # what `from ki_trainer import X` gives; imported on first use (``ki-trainer --help`` stays fast)
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

# public name -> the submodule that defines it: importing ki_trainer does not import torch or transformers
_LAZY = {
    "CheckpointMismatchError": "checkpoints",
    "KnowledgeIntegrationCollator": "collator",
    "KnowledgeIntegrationConfig": "config",
    "LabelSpace": "label_space",
    "MaskedLMTeacher": "merge_distill",
    "MergeDistillConfig": "merge_distill",
    "MergeDistillTrainer": "merge_distill",
    "StudentVocabulary": "merge_distill",
    "build_student": "merge_distill",
    "select_teachers": "merge_distill",
    "integration_metrics": "metrics",
    "TeacherNaNError": "querying",
    "mc_dropout_probs": "querying",
    "query_teachers": "querying",
    "Router": "routing",
    "build_router": "routing",
    "get_router": "routing",
    "list_routers": "routing",
    "register_router": "routing",
    "IntegrationOutput": "strategies",
    "IntegrationStrategy": "strategies",
    "StrategyOptions": "strategies",
    "TeacherSignals": "strategies",
    "get_strategy": "strategies",
    "list_strategies": "strategies",
    "register_strategy": "strategies",
    "CorruptSignalCacheError": "signal_cache",
    "StaleSignalCacheError": "signal_cache",
    "Teacher": "teacher",
    "KnowledgeIntegrationTrainer": "trainer",
    "NonFiniteLossError": "trainer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # ki_trainer.routing etc. after a bare import
        raise AttributeError(f"module 'ki_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
