"""How the unlabeled pool divides between the teachers, estimated label-free, and routing that uses it.

A transductive router turns each teacher's raw competence score on a row (a relative Mahalanobis
distance, a prototype cosine, a standardized certainty) into a probability over teachers. Z-scoring
each teacher's score over the whole pool, and comparing the z-scores, silently assumes that every
teacher owns the same share of the pool: on a pool that is 90% teacher A, A's pool mean IS its
in-domain level, so A's own rows score about zero and lose to chance (measured: 0.47 routing
accuracy at 90:10, below the 0.90 of always picking A).

Here the pool is modelled instead as what it is, a mixture of owners. Row ``i`` belongs to exactly
one teacher ``k`` (share ``pi_k``); given its owner, each teacher ``t``'s raw score is Gaussian, with
an "in" mean when ``t`` owns the row and an "out" mean otherwise (one variance per teacher, so the
evidence is monotone in the score). EM over the pool's raw scores, with no label, gives the shares
and the per-teacher in/out levels; a row's owner posterior is then

    log P(owner = k | row) = log pi_k + LLR_k(s_k) + const,
    LLR_k(s) = log N(s; mu_in_k, var_k) - log N(s; mu_out_k, var_k)

(each teacher is calibrated against its own in- and out-of-domain rows, not against the pool mean).
On a balanced pool this is the z-score rule with each teacher weighted by how well its score
separates its rows; on a skewed pool the prior and the in/out levels follow the pool.

The estimate is kept only when the mixture explains the scores clearly better than no owner
structure at all (BIC against one Gaussian per teacher) and every teacher scores its own rows higher
than the others' (``mu_in > mu_out``); otherwise the router keeps the equal-shares z-scores and says so.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

LOG_2PI = math.log(2 * math.pi)


def _gaussian_log_density(s: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((s - mean) ** 2 / var + var.log() + LOG_2PI)


def _mixture_step(s: torch.Tensor, resp: torch.Tensor, var_floor: torch.Tensor) -> dict[str, torch.Tensor]:
    """M-step: shares, in/out means and the tied variance per teacher from owner responsibilities ``resp``."""
    n = s.shape[0]
    w_in, w_out = resp, 1.0 - resp
    shares = resp.mean(0).clamp_min(1e-12)
    shares = shares / shares.sum()
    mu_in = (w_in * s).sum(0) / w_in.sum(0).clamp_min(1e-12)
    mu_out = (w_out * s).sum(0) / w_out.sum(0).clamp_min(1e-12)
    var = ((w_in * (s - mu_in) ** 2).sum(0) + (w_out * (s - mu_out) ** 2).sum(0)) / n
    return {"shares": shares, "mu_in": mu_in, "mu_out": mu_out, "var": torch.maximum(var, var_floor)}


def _joint(s: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``log P(row, owner = k)`` up to nothing (a proper log density), and the owner logits ``log pi + LLR``."""
    log_in = _gaussian_log_density(s, params["mu_in"], params["var"])
    log_out = _gaussian_log_density(s, params["mu_out"], params["var"])
    logits = params["shares"].log() + log_in - log_out
    return logits + log_out.sum(1, keepdim=True), logits


def _run_em(s: torch.Tensor, resp: torch.Tensor, var_floor: torch.Tensor, max_iter: int, tol: float
            ) -> tuple[dict[str, torch.Tensor], float]:
    previous = -math.inf
    params = _mixture_step(s, resp, var_floor)
    log_likelihood = previous
    for _ in range(max_iter):
        joint, _ = _joint(s, params)
        log_likelihood = float(torch.logsumexp(joint, 1).sum())
        resp = torch.softmax(joint, 1)
        params = _mixture_step(s, resp, var_floor)
        if log_likelihood - previous <= tol * abs(log_likelihood):
            break
        previous = log_likelihood
    joint, _ = _joint(s, params)
    return params, float(torch.logsumexp(joint, 1).sum())


def fit_owner_mixture(raw: torch.Tensor, start: Optional[torch.Tensor] = None, max_iter: int = 300,
                      tol: float = 1e-9) -> dict[str, Any]:
    """Fit the owner mixture to ``raw`` (``[rows, teachers]`` raw competence scores, higher = more competent).

    ``start`` (``[rows, teachers]`` logits; default: the equal-shares z-scores of ``raw``) seeds EM; it is also restarted with
    the start tilted towards each teacher in turn (prior 0.8 on it), so a skewed pool is found whichever teacher
    dominates, and the fit with the highest likelihood is kept (the set of starts does not depend on the
    teachers' order). Returns the parameters (``shares``, ``mu_in``, ``mu_out``, ``var``: fp32 ``[teachers]``
    tensors), ``accepted`` (whether the estimate is trusted, see the module docstring) and ``reason``.
    """
    if raw.dim() != 2 or raw.shape[0] < 2:
        raise ValueError(f"fit_owner_mixture needs a [rows >= 2, teachers] score matrix, got {tuple(raw.shape)}.")
    if not torch.isfinite(raw).all():
        bad = (~torch.isfinite(raw)).any(1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"Router raw scores are not finite (pool rows {bad}...): cannot estimate the teacher shares.")
    n, num_teachers = raw.shape
    # Standardize each teacher's raw scores first (affine: the model is unchanged) so tolerances are scale-free.
    centre, scale = raw.double().mean(0), raw.double().std(0, unbiased=False).clamp_min(1e-12)
    s = (raw.double() - centre) / scale
    start = s if start is None else start
    var_floor = torch.full((num_teachers,), 1e-4, dtype=torch.float64)
    starts = [start.double()]
    if num_teachers > 1:
        for k in range(num_teachers):
            tilt = torch.full((num_teachers,), math.log(0.2 / (num_teachers - 1)), dtype=torch.float64)
            tilt[k] = math.log(0.8)
            starts.append(start.double() + tilt)
    best: Optional[tuple[dict[str, torch.Tensor], float]] = None
    for logits in starts:
        params, log_likelihood = _run_em(s, torch.softmax(logits, 1), var_floor, max_iter, tol)
        if best is None or log_likelihood > best[1] + 1e-9 * abs(log_likelihood):
            best = (params, log_likelihood)
    params, log_likelihood = best
    # No owner structure at all: one Gaussian per teacher (2 parameters each; the mixture has 4T - 1).
    null = float(_gaussian_log_density(s, s.mean(0), s.var(0, unbiased=False).clamp_min(1e-4)).sum())
    delta_bic = 2.0 * (log_likelihood - null) - (2 * num_teachers - 1) * math.log(n)
    reason = ""
    if num_teachers < 2:
        reason = "one teacher"
    elif delta_bic <= 0:
        reason = f"the scores show no owner structure (BIC gain {delta_bic:.1f} <= 0)"
    elif bool((params["mu_in"] <= params["mu_out"]).any()):
        worse = (params["mu_in"] <= params["mu_out"]).nonzero().flatten().tolist()
        reason = f"teacher(s) {worse} would score their own rows lower than the others'"
    # Back to the caller's scale: s = (raw - centre) / scale.
    out = {
        "shares": params["shares"].float(),
        "mu_in": (params["mu_in"] * scale + centre).float(),
        "mu_out": (params["mu_out"] * scale + centre).float(),
        "var": (params["var"] * scale**2).float(),
        "log_likelihood": log_likelihood,
        "delta_bic": delta_bic,
        "accepted": not reason,
        "reason": reason,
    }
    return out


def owner_logits(raw: torch.Tensor, mixture: dict[str, Any]) -> torch.Tensor:
    """``[rows, teachers]`` owner log-posteriors (up to a per-row constant): ``log pi_k + LLR_k(raw_k)``."""
    params = {k: mixture[k].to(raw.device).double() for k in ("shares", "mu_in", "mu_out", "var")}
    return _joint(raw.double(), params)[1].float()


def describe_shares(shares: Sequence[float], names: Optional[Sequence[str]] = None) -> str:
    """``"the pool looks 88% teacher A, 12% teacher B"``."""
    values = [float(v) for v in shares]
    names = list(names) if names is not None else [str(t) for t in range(len(values))]
    if len(names) != len(values):
        raise ValueError(f"{len(values)} shares but {len(names)} teacher names.")
    return "the pool looks " + ", ".join(f"{100 * v:.0f}% teacher {name}" for v, name in zip(values, names))
