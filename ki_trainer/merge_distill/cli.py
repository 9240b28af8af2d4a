"""Deprecated location of the ``ki-trainer merge-distill`` command: it lives in :mod:`ki_trainer.cli.merge_distill`.

Kept so that ``from ki_trainer.merge_distill.cli import ...`` in existing scripts keeps working; nothing inside
``ki_trainer`` imports this module (the command package imports MergeDistill, never the other way round).
"""

from .._deprecation import warn_renamed
from ..cli.merge_distill import *  # noqa: F401,F403

warn_renamed("The module ki_trainer.merge_distill.cli", "ki_trainer.cli.merge_distill")
