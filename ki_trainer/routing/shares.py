"""How the unlabeled pool divides between the teachers, estimated label-free, and routing that uses it.

A transductive router turns each teacher's raw competence score on a row (a relative Mahalanobis
distance, a prototype cosine, a standardized certainty) into a probability over teachers by z-scoring
each teacher's score over the whole pool and comparing the z-scores. That silently assumes that every
teacher owns the same share of the pool: on a pool that is 95% teacher A, A's pool mean IS its
in-domain level, so A's own rows score about zero and lose half the time (measured on debian_sections20
2x10: 55.5% of the pool rows routed right at 95:5, below the 95% of always answering A).

Here the pool is modelled as a mixture of owners: each row belongs to one teacher (share ``pi_k``), and
the teachers' z-scores of a row, seen only through how they DIFFER (what moves every teacher's score
together, such as short or generic text, says nothing about the owner), follow one heavy-tailed
(Student-t) component per owner with a shared scatter. EM over the pool's scores, without a label,
gives the shares; the router then routes by ``z_k + log pi_k`` (its z-scores, plus the log of each
teacher's estimated share as the prior).

The estimate is used only when it is trustworthy and matters: the mixture must beat a single
component by BIC (otherwise the scores show no owner structure), each teacher's component must raise
that teacher's score above the others, and some share must lie at least ``min_skew`` (0.1) from
``1/teachers`` (on the balanced 2x10 pool the estimate reads 60:40; a prior that small costs more than it
gains). Otherwise the router keeps the equal-shares z-scores, and says so.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

def _t_log_density(delta: torch.Tensor, logdet: torch.Tensor, dim: int, nu: float) -> torch.Tensor:
    """Log density of a ``dim``-variate Student-t with ``nu`` degrees of freedom at squared Mahalanobis ``delta``."""
    return (math.lgamma((nu + dim) / 2) - math.lgamma(nu / 2) - 0.5 * dim * math.log(nu * math.pi)
            - 0.5 * logdet - 0.5 * (nu + dim) * torch.log1p(delta / nu))


def _t_mixture(z: torch.Tensor, resp: torch.Tensor, nu: float, max_iter: int, tol: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """EM for ``K = resp.shape[1]`` Student-t components with one shared scatter matrix (fixed ``nu``).

    Returns (shares ``[K]``, means ``[K, T]``, row log-joint ``[N, K]``, log-likelihood)."""
    n, dim = z.shape
    k = resp.shape[1]
    eye = torch.eye(dim, dtype=z.dtype)
    u = torch.ones(n, k, dtype=z.dtype)  # the t-weights: rows far from a component count less in its fit
    previous = -math.inf
    for _ in range(max_iter):
        shares = resp.mean(0).clamp_min(1e-12)
        w = resp * u
        means = (w.T @ z) / w.sum(0).clamp_min(1e-12)[:, None]
        scatter = sum(((w[:, j : j + 1] * (z - means[j])).T @ (z - means[j])) for j in range(k)) / n + 1e-6 * eye
        precision, logdet = torch.linalg.inv(scatter), torch.logdet(scatter)
        delta = torch.stack([(((z - means[j]) @ precision) * (z - means[j])).sum(1) for j in range(k)], 1)
        joint = shares.log() + _t_log_density(delta, logdet, dim, nu)
        log_likelihood = float(torch.logsumexp(joint, 1).sum())
        resp = torch.softmax(joint, 1)
        u = (nu + dim) / (nu + delta)
        if log_likelihood - previous <= tol * abs(log_likelihood):
            break
        previous = log_likelihood
    return resp.mean(0), means, joint, log_likelihood


def _match_components(means: torch.Tensor) -> list[int]:
    """``order[t]``: the component that teacher t owns, the one that raises t's score most above the others'
    (greedy on ``means[k, t] - mean_k means[k, t]``; the result does not depend on the teachers' order)."""
    lift = means - means.mean(0, keepdim=True)
    order = [-1] * means.shape[1]
    free_k, free_t = set(range(means.shape[0])), set(range(means.shape[1]))
    while free_t:
        k, t = max(((k, t) for k in free_k for t in free_t), key=lambda kt: float(lift[kt[0], kt[1]]))
        order[t] = k
        free_k.discard(k)
        free_t.discard(t)
    return order


def fit_owner_mixture(z: torch.Tensor, nu: float = 4.0, max_iter: int = 200, tol: float = 1e-7) -> dict[str, Any]:
    """Estimate the pool's teacher shares from ``z`` (``[rows, teachers]`` per-teacher competence scores, z-scored
    over the pool; higher = more competent), label-free.

    The rows are modelled as a mixture of one heavy-tailed (Student-t, ``nu`` degrees of freedom) component per
    owner, in the joint space of all teachers' scores, with one shared scatter matrix (which absorbs what moves
    every teacher's score together, e.g. short or generic text); heavy tails keep a long tail of one teacher's
    scores from being taken for an owner of its own. EM starts from the scores themselves and from the scores
    tilted towards each teacher in turn (so a skewed pool is found whichever teacher dominates; the set of starts
    does not depend on the teachers' order); the fit with the highest likelihood is kept, and each component is
    matched to the teacher whose score it raises most.

    Returns ``shares`` (``[teachers]``, fp32), ``means`` (``[teachers, teachers]``: component t's mean row-centred
    score of each teacher), ``accepted`` (whether the estimate is trusted: the mixture beats a single component by
    BIC, and each teacher's component raises that teacher's score above every other component) and ``reason``.
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"fit_owner_mixture needs a [rows >= 2, teachers] score matrix, got {tuple(z.shape)}.")
    if not torch.isfinite(z).all():
        bad = (~torch.isfinite(z)).any(1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"Router scores are not finite (pool rows {bad}...): cannot estimate the teacher shares.")
    n, num_teachers = z.shape
    if num_teachers < 2:
        return {"shares": torch.ones(1), "accepted": False, "reason": "one teacher", "log_likelihood": 0.0}
    s = z.double()
    s = (s - s.mean(0)) / s.std(0, unbiased=False).clamp_min(1e-12)
    # Only how the teachers' scores differ on a row tells its owner (what moves all of them together, e.g. short or
    # generic text, does not): the mixture lives in the sum-zero subspace (T - 1 dimensions; for two teachers, the
    # difference of their scores).
    q, _ = torch.linalg.qr(torch.eye(num_teachers, dtype=s.dtype) - 1.0 / num_teachers)
    basis = q[:, : num_teachers - 1]
    best = None
    for tilt in [None] + list(range(num_teachers)):
        start = s.clone()
        if tilt is not None:
            start[:, tilt] += 1.5
        shares, means, joint, log_likelihood = _t_mixture(s @ basis, torch.softmax(3.0 * start, 1), nu, max_iter, tol)
        means = means @ basis.T  # back to one (row-centred) coordinate per teacher
        if best is None or log_likelihood > best[3] + 1e-9 * abs(log_likelihood):
            best = (shares, means, joint, log_likelihood)
    shares, means, _, log_likelihood = best
    # No owner structure: one component (heavy-tailed or Gaussian) explains the score differences as well (BIC; the
    # mixture has T(T-1) more parameters: T-1 more means of T-1 coordinates, and T-1 shares).
    single = max(_t_mixture(s @ basis, torch.ones(n, 1, dtype=s.dtype), dof, max_iter, tol)[3] for dof in (nu, 1e6))
    delta_bic = 2.0 * (log_likelihood - single) - num_teachers * (num_teachers - 1) * math.log(n)
    order = _match_components(means)
    shares, means = shares[order], means[order]
    own = means.diagonal()
    others = means.masked_fill(torch.eye(num_teachers, dtype=torch.bool), -math.inf).max(0).values
    reason = ""
    if delta_bic <= 0:
        reason = f"the scores show no owner structure (BIC gain {delta_bic:.1f} <= 0)"
    elif bool((own <= others).any()):
        worse = (own <= others).nonzero().flatten().tolist()
        reason = f"no component raises teacher(s) {worse}'s score above the others'"
    return {"shares": (shares / shares.sum()).float(), "means": means.float(), "log_likelihood": log_likelihood,
            "delta_bic": delta_bic, "accepted": not reason, "reason": reason}


def owner_logits(z: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """``[rows, teachers]`` owner logits: each teacher's pool z-score plus the log of its estimated share."""
    return z + shares.to(z.device).clamp_min(1e-6).log()


def describe_shares(shares: Sequence[float], names: Optional[Sequence[str]] = None, verb: str = "looks") -> str:
    """``"the pool looks 88% teacher A, 12% teacher B"`` (``verb="is"`` for shares the user gave)."""
    values = [float(v) for v in shares]
    names = list(names) if names is not None else [str(t) for t in range(len(values))]
    if len(names) != len(values):
        raise ValueError(f"{len(values)} shares but {len(names)} teacher names.")
    return f"the pool {verb} " + ", ".join(f"{100 * v:.0f}% teacher {name}" for v, name in zip(values, names))
