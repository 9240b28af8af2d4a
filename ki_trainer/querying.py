"""Querying the teacher ensemble: deterministic logits and Monte-Carlo-dropout certainty.

Why it is built this way:
- MC dropout must switch the WHOLE teacher to train mode: BERT's attention dropout follows the
  module's training flag, so enabling only ``nn.Dropout`` layers misses it. The teacher goes back to
  eval mode afterwards (also if the forward raises).
- The K stochastic passes run as ONE forward over the batch repeated K times
  (``repeat_interleave``): every copy draws its own dropout mask, and on a GPU this is several
  times faster than K sequential passes. Chunks of at most ``chunk_size`` rows bound the memory.
- Everything runs under ``torch.no_grad()``; logits are cast to fp32 before any softmax.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Mapping, Optional, Sequence

import torch

from .numerics import certainty_from_probs, mc_mean_probs
from .strategies import TeacherSignals
from .teacher import Teacher

Inputs = Mapping[str, torch.Tensor]


def _forward_in_chunks(model: torch.nn.Module, inputs: Inputs, rows_per_chunk: int) -> torch.Tensor:
    batch = next(iter(inputs.values())).shape[0]
    outputs = []
    for start in range(0, batch, rows_per_chunk):
        chunk = {key: value[start : start + rows_per_chunk] for key, value in inputs.items()}
        outputs.append(model(**chunk).logits.float())
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


@torch.no_grad()
def deterministic_logits(teacher: Teacher, inputs: Inputs, chunk_size: int = 512) -> torch.Tensor:
    """Eval-mode logits ``[B, C_t]`` in fp32."""
    teacher.model.eval()
    return _forward_in_chunks(teacher.model, inputs, chunk_size)


@torch.no_grad()
def mc_dropout_probs(teacher: Teacher, inputs: Inputs, num_samples: int, chunk_size: int = 512) -> torch.Tensor:
    """Mean of ``num_samples`` dropout-on softmax outputs, ``[B, C_t]`` in fp32.

    The batch is repeated ``num_samples`` times row-wise; each chunk holds whole examples (all K
    copies) so the per-example mean never straddles two forwards.
    """
    batch = next(iter(inputs.values())).shape[0]
    examples_per_chunk = max(1, chunk_size // num_samples)
    model = teacher.model
    model.train()
    try:
        means = []
        for start in range(0, batch, examples_per_chunk):
            chunk = {
                key: value[start : start + examples_per_chunk].repeat_interleave(num_samples, dim=0)
                for key, value in inputs.items()
            }
            means.append(mc_mean_probs(model(**chunk).logits, num_samples))
    finally:
        model.eval()
    return means[0] if len(means) == 1 else torch.cat(means)


class TeacherNaNError(FloatingPointError):
    """A teacher produced NaN/inf logits: its weights or inputs are broken; training would be silently wrong."""


def query_teachers(
    teachers: Sequence[Teacher],
    teacher_inputs: Sequence[Inputs],
    certainty_source: Optional[str],
    mc_samples: int = 16,
    chunk_size: int = 512,
    autocast: Callable[[], ContextManager] = nullcontext,
    check_finite: bool = True,
) -> TeacherSignals:
    """Compute the :class:`TeacherSignals` a strategy asks for.

    Args:
        teachers: the prepared teachers.
        teacher_inputs: for each teacher, the (device-resident) inputs its forward takes.
        certainty_source: ``None``, ``"deterministic"`` or ``"mc"``.
        autocast: context manager factory wrapping the teacher forwards (e.g. Accelerate's autocast).
        check_finite: raise :class:`TeacherNaNError` on NaN/inf logits (one device sync).
    """
    if certainty_source not in (None, "deterministic", "mc"):
        raise ValueError(f"Unknown certainty source {certainty_source!r}.")
    logits, certainty = [], []
    with autocast():
        for teacher, inputs in zip(teachers, teacher_inputs):
            teacher_logits = deterministic_logits(teacher, inputs, chunk_size)
            logits.append(teacher_logits)
            if certainty_source == "mc":
                certainty.append(certainty_from_probs(mc_dropout_probs(teacher, inputs, mc_samples, chunk_size)))
            elif certainty_source == "deterministic":
                certainty.append(certainty_from_probs(torch.softmax(teacher_logits, dim=-1)))
    if check_finite:
        finite = torch.stack([torch.isfinite(x).all() for x in logits + certainty]).all()
        if not bool(finite):
            bad = [t.name for t, x in zip(teachers, logits) if not torch.isfinite(x).all()]
            raise TeacherNaNError(
                f"Teacher(s) {bad or [t.name for t in teachers]} produced NaN/inf outputs. Check their weights "
                "(e.g. fp16 overflow: try teacher_dtype='bfloat16' or 'float32') and inputs."
            )
    return TeacherSignals(logits=logits, certainty=torch.stack(certainty, dim=1) if certainty else None)
