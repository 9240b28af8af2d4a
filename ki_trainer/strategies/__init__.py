"""Integration strategies: interchangeable ways to turn teacher signals into a student loss."""

from .base import (
    STRATEGIES,
    IntegrationOutput,
    IntegrationStrategy,
    StrategyOptions,
    TeacherSignals,
    get_strategy,
    list_strategies,
    register_strategy,
)
from .certainty import MUKI, CertaintyIntegration, EntropySelection, margin_weights
from .uhc import UHC
from .vanilla_kd import VanillaKD

__all__ = [
    "STRATEGIES",
    "IntegrationOutput",
    "IntegrationStrategy",
    "StrategyOptions",
    "TeacherSignals",
    "get_strategy",
    "list_strategies",
    "register_strategy",
    "MUKI",
    "CertaintyIntegration",
    "EntropySelection",
    "margin_weights",
    "UHC",
    "VanillaKD",
]
