"""Numerically safe building blocks shared by the integration strategies.

Why a module of its own: the reference implementation used ``torch.log(softmax(...))`` against
zero-padded targets and ``p * log p`` for entropies, both of which turn into NaN/inf as soon as a
teacher saturates or a student probability underflows. Everything here works in fp32, uses
``log_softmax`` and ``xlogy``, and treats ``0 * log 0`` (and ``0 * -inf``) as 0.
"""

from __future__ import annotations

import math

import torch


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of ``probs`` along the last dim divided by ``log C`` (so it lies in [0, 1])."""
    num_classes = probs.shape[-1]
    if num_classes < 2:
        raise ValueError("Normalised entropy needs at least 2 classes.")
    probs = probs.float()
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


def certainty_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """MUKI's certainty score ``s = 1 - H(p) / log C``: 1 for a one-hot prediction, 0 for uniform."""
    return 1.0 - normalized_entropy(probs)


def certainty_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Certainty of one deterministic pass: ``certainty_from_probs(softmax(logits))`` in fp32."""
    return certainty_from_probs(torch.softmax(logits.float(), dim=-1))


def kl_from_log_probs(target: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(target || exp(log_probs))`` with exact zeros where the target is zero.

    ``target`` may contain exact zeros (padded teacher distributions); where it does, the student
    term contributes nothing even if ``log_probs`` is ``-inf``.
    """
    target = target.float()
    log_probs = log_probs.float()
    cross = torch.where(target > 0, target * log_probs, torch.zeros_like(log_probs))
    return (torch.special.xlogy(target, target) - cross).sum(-1)


def mc_mean_probs(logits: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Average the PROBABILITIES of ``num_samples`` stochastic passes laid out as ``[B * K, C]``.

    The rows of one example are consecutive (``repeat_interleave`` layout).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.view(-1, num_samples, probs.shape[-1]).mean(1)


def mc_statistics(logits: torch.Tensor, num_samples: int) -> dict[str, torch.Tensor]:
    """Summaries of ``num_samples`` stochastic passes laid out as ``[B * K, C]`` (rows of one example consecutive).

    Returns fp32 tensors:
        ``mean``: ``[B, C]`` mean of the sample probabilities (what :func:`mc_mean_probs` returns);
        ``mutual_information``: ``[B]`` BALD, ``H(mean) - mean_k H(p_k)`` normalised by ``log C``
        (epistemic part of the uncertainty, in [0, 1]);
        ``top_variance``: ``[B]`` variance over the samples of the probability of the mean's top class.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    num_classes = log_probs.shape[-1]
    log_probs = log_probs.view(-1, num_samples, num_classes)
    probs = log_probs.exp()
    mean = probs.mean(1)
    scale = math.log(num_classes) if num_classes > 1 else 1.0
    predictive = -torch.special.xlogy(mean, mean).sum(-1)
    expected = -(torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))).sum(-1).mean(1)
    mutual_information = ((predictive - expected) / scale).clamp_min(0.0)
    top = mean.argmax(-1)
    top_probs = probs.gather(2, top.view(-1, 1, 1).expand(-1, num_samples, 1)).squeeze(-1)
    top_variance = top_probs.var(1, unbiased=False)
    return {"mean": mean, "mutual_information": mutual_information, "top_variance": top_variance}
