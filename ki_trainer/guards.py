"""Early, clear failures: duplicate teachers, unwritable directories, a NaN/inf training loss.

Each check runs before the work it protects (or, for the loss, at the next logging step / save), so a
bad set-up fails in seconds with a message naming the problem, not after hours with a wrong result.
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import torch
from transformers.utils import logging

from .teacher import Teacher

logger = logging.get_logger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The knowledge-integration loss became NaN/inf: the student's weights are no longer trustworthy."""


def check_teachers_distinct(teachers: Sequence[Teacher]) -> None:
    """Two entries for the same model (the same object, or equal weights in two wrappers) make every
    certainty margin ~0 and the student silently stops learning: reject them."""
    for j, b in enumerate(teachers):
        for i, a in enumerate(teachers[:j]):
            if a.model is b.model and getattr(a, "adapter", None) != getattr(b, "adapter", None):
                continue  # two adapters of one shared PeftModel are two teachers
            same = a.model is b.model or _same_weights(a.model, b.model)
            if same:
                how = "the same model object" if a.model is b.model else "models with identical weights"
                raise ValueError(
                    f"Teachers {i} ({a.name or a.source or '?'}) and {j} ({b.name or b.source or '?'}) are {how}. "
                    "A duplicate teacher makes every certainty margin ~0 (the student stops learning) and counts "
                    "one model twice; pass each teacher once."
                )


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Equal state dicts (cheap when they differ: stops at the first unequal tensor)."""
    state_a, state_b = a.state_dict(), b.state_dict()
    if list(state_a) != list(state_b):
        return False
    for name, x in state_a.items():
        y = state_b[name]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y.to(x.device)):
            return False
    return True


def check_writable(directory: str, what: str) -> None:
    """Fail now, not after hours of work, if ``directory`` cannot be written (nothing is created:
    the probe goes to the directory or, if it does not exist yet, to its nearest existing parent)."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        if not os.path.isdir(probe):
            raise NotADirectoryError(f"{probe} is not a directory")
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".ki-write-test-"):
            pass
    except OSError as err:
        raise PermissionError(f"{what}={directory!r} cannot be written ({err}); choose another directory.") from None


def check_signal_cache_dir(directory: str) -> bool:
    """:func:`check_writable` for ``signal_cache_dir``, except that a directory that already holds cache files
    may be read-only (a cache shared read-only between users or jobs): it is then read as it is, and rows it
    lacks are refused when they would be computed. Returns whether the directory can be written."""
    try:
        check_writable(directory, "signal_cache_dir")
        return True
    except PermissionError:
        if os.path.isdir(directory) and any(name.endswith(".safetensors") for name in os.listdir(directory)):
            logger.warning(
                f"signal_cache_dir={directory!r} cannot be written: its cached teacher signals are read as they are, "
                "and rows missing from them cannot be added (a precompute that needs them stops before any work)."
            )
            return False
        raise


class FiniteLossGuard:
    """Counts training steps with a NaN/inf loss on the device (no host sync per step); :meth:`check` raises
    :class:`NonFiniteLossError` when any happened since training began (one host sync)."""

    def __init__(self, device: torch.device, what: str = "knowledge-integration") -> None:
        self.non_finite_steps = torch.zeros((), dtype=torch.long, device=device)
        self.checked_step = 0
        self.what = what

    def record(self, loss: torch.Tensor) -> None:
        self.non_finite_steps += (~torch.isfinite(loss.detach())).long()

    def check(self, accelerator, step: int, when: str, collective: bool = True) -> None:
        """Raise if any recorded step had a NaN/inf loss (summed over processes when ``collective``, so every
        rank stops together)."""
        flag = self.non_finite_steps
        if collective and accelerator.num_processes > 1:
            flag = accelerator.reduce(flag.clone(), reduction="sum")
        count = int(flag.item())
        if count:
            since = self.checked_step  # the flag stays set: later saves refuse too
            raise NonFiniteLossError(
                f"The {self.what} loss was NaN/inf in {count} training step(s) between step {since} and "
                f"{step} (found {when}); the student's weights are no longer trustworthy, so training stops and "
                "nothing more is saved. Usual causes: teachers returning NaN/inf (keep check_teacher_outputs=True), "
                "fp16 overflow (use bf16 or fp32), a too large learning_rate."
            )
        self.checked_step = step
