"""Competence estimators ("routers"): which teacher is competent on which unlabeled example.

``list_routers()`` names them; ``KnowledgeIntegrationConfig(router=...)`` picks one for the
certainty-based strategies. See :mod:`ki_trainer.routing.base` for the interface.
"""

from .base import ROUTERS, SIGNAL_KINDS, Router, build_router, get_router, list_routers, register_router
from .confidence import (
    EnergyRouter,
    EntropyRouter,
    MaxProbRouter,
    MCEntropyRouter,
    MCMutualInformationRouter,
    MCVarianceRouter,
)
from .pool import (
    ConsensusRouter,
    KNNSmoothingRouter,
    PrototypeRouter,
    RelativeMahalanobisRouter,
    SelfTrainingRouter,
    StandardizedRouter,
    confident_rows,
)
from .shares import describe_shares, fit_owner_mixture, owner_logits

__all__ = [
    "ROUTERS",
    "SIGNAL_KINDS",
    "Router",
    "build_router",
    "get_router",
    "list_routers",
    "register_router",
    "EnergyRouter",
    "EntropyRouter",
    "MaxProbRouter",
    "MCEntropyRouter",
    "MCMutualInformationRouter",
    "MCVarianceRouter",
    "ConsensusRouter",
    "KNNSmoothingRouter",
    "PrototypeRouter",
    "RelativeMahalanobisRouter",
    "SelfTrainingRouter",
    "StandardizedRouter",
    "confident_rows",
    "describe_shares",
    "fit_owner_mixture",
    "owner_logits",
]
