"""BERT-style masking (15%, 80/10/10) in a teacher's token space.

The text of language ℓ is tokenized by teacher(ℓ); the positions to predict are chosen there,
and the SAME (masked) token sequence mapped to student ids is the student's input, so teacher and
student predict exactly the same positions. Random replacements are drawn from teacher tokens that
have a student counterpart, so both sides see the same replacement token.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch


def mask_tokens(
    input_ids: torch.Tensor,
    eligible: torch.Tensor,
    mask_id: int,
    replacement_ids: torch.Tensor,
    probability: float = 0.15,
    generator: Optional[torch.Generator] = None,
    at_least_one: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose positions to predict and corrupt them.

    Args:
        input_ids: ``(batch, length)`` teacher token ids.
        eligible: same shape, bool: positions that may be masked (real, non-special tokens with a
            student counterpart).
        mask_id: the teacher's mask token id.
        replacement_ids: 1-D teacher ids random replacements are drawn from.
        probability: share of eligible positions to predict (each independently).
        generator: CPU generator for reproducible masking.
        at_least_one: a row with eligible tokens but no position drawn gets one (short texts would
            otherwise contribute nothing).

    Returns:
        ``(masked_input_ids, predict)``: of the ``predict`` positions 80% become ``mask_id``, 10% a
        random replacement, 10% stay unchanged.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"mask probability must be in (0, 1), got {probability}.")
    if replacement_ids.numel() == 0:
        raise ValueError("No replacement tokens to draw from (no teacher token maps to the student vocabulary).")
    eligible = eligible.bool()
    draw = lambda: torch.rand(input_ids.shape, generator=generator)  # noqa: E731
    predict = (draw() < probability) & eligible
    if at_least_one:
        empty = ~predict.any(dim=1) & eligible.any(dim=1)
        if empty.any():
            scores = torch.rand(input_ids.shape, generator=generator).masked_fill(~eligible, -1.0)
            forced = torch.zeros_like(predict)
            forced[torch.arange(len(input_ids)), scores.argmax(dim=1)] = True
            predict |= forced & empty[:, None]
    roll = draw()
    to_mask = predict & (roll < 0.8)
    to_random = predict & (roll >= 0.8) & (roll < 0.9)
    masked = input_ids.clone()
    masked[to_mask] = mask_id
    picks = torch.randint(len(replacement_ids), input_ids.shape, generator=generator)
    masked[to_random] = replacement_ids[picks[to_random]]
    return masked, predict


def example_generator(seed: int, example_id: str) -> torch.Generator:
    """A generator determined by ``(seed, example id)``: the masking of a row is the same in every
    run, so precomputed teacher signals stay valid and evaluation is repeatable."""
    digest = hashlib.blake2b(f"{seed}|{example_id}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
