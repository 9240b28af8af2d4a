"""Transductive routers: fitted label-free on the whole unlabeled pool, then applied row by row.

A teacher's certainty in itself is a weak competence signal: a fine-tuned classifier is often
confidently wrong on text outside its classes, and teachers of different architectures or languages
are calibrated differently. The pool — every unlabeled row the student will learn from — holds
more: where each teacher's confident predictions lie in feature space, which rows are neighbours,
and how the rows divide between the teachers. These routers use it. None sees a gold label: the
fit reads only the teachers' signals on the pool (logits, MC statistics, pooled features).

* ``standardized``: a confidence router's scores z-scored per teacher over the pool (each teacher
  compared with itself), turned into probabilities over teachers.
* ``prototype``: cosine of each teacher's pooled feature to the class prototypes built from that
  teacher's confident pseudo-labels on the pool, minus cosine to the pool mean (a text near one of
  the teacher's classes, and not merely near everything, is one it knows).
* ``relative_mahalanobis``: class-conditional Gaussians (shared covariance, fitted on the teacher's
  pseudo-labelled pool rows) minus one background Gaussian of the whole pool (Ren et al., 2021),
  per teacher.
* ``consensus``: the mean of several z-scored routers (default: MC mutual information, MC entropy,
  prototype).
* ``knn_smoothing``: a row's z-scores averaged with those of its k nearest pool neighbours in the
  teachers' joint feature space (a neighbourhood tends to belong to one teacher).
* ``self_training`` (the recommended router; see docs/routing.md): a small logistic-regression head
  over the teachers' pooled features and predictions, trained on the pool rows that the smoothed
  consensus routes with a high margin (class-balanced), re-labelled and retrained for a few rounds.
  Its output is a probability over teachers.

Every router's output is a probability over teachers (rows sum to 1), so soft selection and margin
re-weighting read it the same way.

Skewed pools: with ``shares="estimate"`` (what the default ``shares="auto"`` does for two teachers; for more it
assumes equal shares, because the estimate misread a balanced real pool of four teachers) each router estimates the
shares label-free (:mod:`ki_trainer.routing.shares`) and, when they are clearly unequal, adds their log as the
prior; the estimate is kept in the router state (``router.shares``,
``router.describe_shares(names)``: "the pool looks 88% teacher A, 12% teacher B"), logged and put on the model card.
``shares="equal"`` keeps the plain pool z-scores. With an estimate in use the router also fits loss weights per routed
teacher (``router.row_weights``; applied by the trainer with ``share_weighting="balanced"``, the default) under which
every teacher's routed rows carry the same total loss weight, so that the student does not forget a minority
teacher's classes. A pool with fewer than ``min_rows_per_teacher`` (10) rows per
teacher is not fitted on: the router warns and routes by ``entropy``, which needs no fit.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.utils import logging

from ..strategies.base import TeacherSignals
from .base import Router, build_router, get_router, register_router

logger = logging.get_logger(__name__)

from .transductive import (  # noqa: F401  (the shared base; confident_rows and the constants are public here too)
    FALLBACK_ROUTER,
    MIN_ROWS_PER_TEACHER,
    MIN_SKEW,
    SHARES,
    TIE_TOLERANCE,
    _POOL_DEFAULTS,
    _features,
    _normalize,
    _probabilities,
    _pseudo_label_mask,
    _set_shares,
    _TransductiveRouter,
    _zscore,
    _zscore_fit,
    _ZScoredRouter,
    confident_rows,
)


# ---------------------------------------------------------------------- routers
@register_router
class StandardizedRouter(_ZScoredRouter):
    """A confidence router (``base``) z-scored per teacher over the pool."""

    name = "standardized"
    requires = frozenset({"logits", "mc"})
    defaults = {"base": "mc_entropy", "temperature": 1.0, **_POOL_DEFAULTS}

    def _base(self) -> Router:
        base = build_router(self.options["base"])
        if base.needs_fit:
            raise ValueError(f"standardized: base router {self.options['base']!r} must be a confidence router.")
        return base

    def raw_score(self, signals: TeacherSignals) -> torch.Tensor:
        return self._base().score(signals)


@register_router
class PrototypeRouter(_ZScoredRouter):
    name = "prototype"
    requires = frozenset({"logits", "features"})
    defaults = {"share": 0.5, "temperature": 1.0, **_POOL_DEFAULTS}

    def raw_fit(self, signals: TeacherSignals) -> None:
        prototypes, centres = [], []
        for logits, features in zip(signals.logits, _features(signals)):
            normed = _normalize(features)
            labels, keep = _pseudo_label_mask(torch.softmax(logits.float(), -1), self.options["share"])
            centre = _normalize(normed.mean(0))
            protos = torch.stack([
                _normalize(normed[keep & (labels == c)].mean(0)) if (keep & (labels == c)).any() else centre
                for c in range(logits.shape[1])
            ])
            prototypes.append(protos)
            centres.append(centre)
        self.state["prototypes"] = prototypes
        self.state["centres"] = centres

    def raw_score(self, signals: TeacherSignals) -> torch.Tensor:
        scores = []
        for features, protos, centre in zip(_features(signals), self.state["prototypes"], self.state["centres"]):
            normed = _normalize(features)
            protos, centre = protos.to(normed.device), centre.to(normed.device)
            scores.append((normed @ protos.T).max(1).values - normed @ centre)
        return torch.stack(scores, dim=1)


@register_router
class RelativeMahalanobisRouter(_ZScoredRouter):
    name = "relative_mahalanobis"
    requires = frozenset({"logits", "features"})
    defaults = {"share": 1.0, "shrinkage": 0.1, "temperature": 1.0, **_POOL_DEFAULTS}

    @staticmethod
    def _precision(centred: torch.Tensor, shrinkage: float) -> torch.Tensor:
        cov = centred.T @ centred / max(len(centred), 1)
        # The floor keeps a degenerate pool (one row, identical rows) invertible: the scores then tie.
        ridge = max(shrinkage * float(cov.diagonal().mean()), 1e-6)
        cov = cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        return torch.linalg.inv(cov.double()).float()

    def raw_fit(self, signals: TeacherSignals) -> None:
        params = []
        for logits, features in zip(signals.logits, _features(signals)):
            labels, keep = _pseudo_label_mask(torch.softmax(logits.float(), -1), self.options["share"])
            mean_all = features.mean(0)
            means = torch.stack([
                features[keep & (labels == c)].mean(0) if (keep & (labels == c)).any() else mean_all
                for c in range(logits.shape[1])
            ])
            shrink = self.options["shrinkage"]
            precision = self._precision(features[keep] - means[labels[keep]], shrink)
            background = self._precision(features - mean_all, shrink)
            params.append({"means": means, "precision": precision, "mean_all": mean_all, "background": background})
        self.state["gaussians"] = params

    def raw_score(self, signals: TeacherSignals) -> torch.Tensor:
        scores = []
        for features, p in zip(_features(signals), self.state["gaussians"]):
            p = {k: v.to(features.device) for k, v in p.items()}
            diffs = features[:, None, :] - p["means"][None]
            class_distance = torch.einsum("bcd,de,bce->bc", diffs, p["precision"], diffs).min(1).values
            centred = features - p["mean_all"]
            background_distance = torch.einsum("bd,de,be->b", centred, p["background"], centred)
            scores.append(-(class_distance - background_distance))
        return torch.stack(scores, dim=1)


def _member(name: str, options: dict[str, Any]) -> "_TransductiveRouter":
    """A pool router for a combination: ``name`` itself (with the combination's share and pool-size options), or, for
    a confidence router, ``standardized`` over it (calibrated on the pool the same way)."""
    inherited = {k: options[k] for k in _POOL_DEFAULTS}
    router = build_router(name)
    if isinstance(router, _TransductiveRouter):
        member = build_router(name, inherited)
    elif router.needs_fit:
        raise ValueError(f"Router {name!r} cannot be combined: it is neither a confidence nor a pool router.")
    else:
        member = StandardizedRouter(base=name, **inherited)
    member.quiet = True  # the combination reports what it uses
    return member


def _implied_shares(router: "_TransductiveRouter", members: Sequence["_TransductiveRouter"]) -> None:
    """A combination's shares: the mean of its members' estimates, when every member estimated shares (each member
    routes with its own estimate as its prior); else the members' note."""
    if all(m.shares is not None for m in members):
        router.state["shares"] = torch.stack([m.shares for m in members]).mean(0)
        if all(m.state.get("shares_given") for m in members):  # router_options shares: the user's, not an estimate
            router.state["shares_given"] = True
    else:
        notes = [m.describe_shares() for m in members if m.shares is None]
        router.state["shares_note"] = "; ".join(dict.fromkeys(notes)).replace("not estimated (", "").rstrip(")") \
            or "equal shares assumed"
    router._log_shares()


@register_router
class ConsensusRouter(_TransductiveRouter):
    """Mean of several pool routers' owner log-odds (a confidence router is calibrated on the pool first, as
    ``standardized`` over it)."""

    name = "consensus"
    requires = frozenset({"logits", "mc", "features"})
    defaults = {"members": ["relative_mahalanobis", "prototype"], "temperature": 1.0, **_POOL_DEFAULTS}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        kinds: set[str] = set()
        for name in self.options["members"]:
            kinds |= set(get_router(name).requires)  # unknown members fail at construction
        self.requires = frozenset(kinds)  # what THIS combination reads (the class lists the widest case)

    def _fit(self, signals: TeacherSignals) -> None:
        members = [_member(name, self.options).fit(signals) for name in self.options["members"]]
        self.state["members"] = [{"name": m.name, "router": m.state_dict()} for m in members]
        _implied_shares(self, members)

    def _owner_logits(self, signals: TeacherSignals) -> torch.Tensor:
        total = None
        for member in self.state["members"]:
            router = build_router(member["name"])
            if "router" in member:
                router.load_state_dict(member["router"])
                z = router.owner_logits(signals)
            else:  # a state saved before confidence members were calibrated as `standardized`
                z = _zscore(router.score(signals), member["zscore"])
            total = z if total is None else total + z
        return total / len(self.state["members"])


def _joint_features(signals: TeacherSignals) -> torch.Tensor:
    """Every teacher's L2-normalised pooled feature, concatenated and normalised again."""
    return _normalize(torch.cat([_normalize(f) for f in _features(signals)], dim=1))


@register_router
class KNNSmoothingRouter(_TransductiveRouter):
    """A base router's pool owner log-odds averaged over each row's k nearest pool neighbours."""

    name = "knn_smoothing"
    requires = frozenset({"logits", "mc", "features"})
    defaults = {"base": "relative_mahalanobis", "neighbours": 10, "self_weight": 0.5, "temperature": 1.0,
                **_POOL_DEFAULTS}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.requires = frozenset(set(build_router(self.options["base"]).requires) | {"logits", "features"})

    def _fit(self, signals: TeacherSignals) -> None:
        base = _member(self.options["base"], self.options).fit(signals)
        self.state["base"] = base.state_dict()
        self.state["base_name"] = base.name
        self.state["pool_features"] = _joint_features(signals).half()
        self.state["pool_z"] = base.owner_logits(signals)
        _implied_shares(self, [base])

    def _owner_logits(self, signals: TeacherSignals) -> torch.Tensor:
        base = build_router(self.state.get("base_name", self.options["base"])).load_state_dict(self.state["base"])
        own = base.owner_logits(signals) if hasattr(base, "owner_logits") else base.score(signals)
        pool = self.state["pool_features"].float().to(own.device)
        pool_z = self.state["pool_z"].to(own.device)
        query = _joint_features(signals).to(own.device)
        k = min(int(self.options["neighbours"]), len(pool))
        smoothed = []
        for start in range(0, len(query), 1024):
            neighbours = (query[start : start + 1024] @ pool.T).topk(k, dim=1).indices
            smoothed.append(pool_z[neighbours].mean(1))
        weight = float(self.options["self_weight"])
        return weight * own + (1 - weight) * torch.cat(smoothed)


@register_router
class SelfTrainingRouter(_TransductiveRouter):
    """A logistic-regression head over the teachers' features and predictions, trained on confidently
    routed pool rows and re-trained on its own confident routes for a few rounds.

    The head is fitted class-balanced (so a teacher that owns few rows still shapes it): its probabilities are
    those of a pool with equal shares. With ``shares="estimate"`` the seed router's estimate of the pool's shares
    is added as the prior (``log(share * teachers)`` on the head's logits), so the head routes a skewed pool as
    it is; with ``shares="equal"`` it stays balanced."""

    name = "self_training"
    requires = frozenset({"logits", "mc", "features"})
    defaults = {
        "seed_router": "relative_mahalanobis",
        "share": 0.7,
        "rounds": 2,
        "weight_decay": 1e-3,
        "max_iter": 200,
        **_POOL_DEFAULTS,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.requires = frozenset(set(build_router(self.options["seed_router"]).requires) | {"logits", "features"})

    @staticmethod
    def _inputs(signals: TeacherSignals) -> torch.Tensor:
        parts = [_normalize(f) for f in _features(signals)]
        parts += [torch.softmax(x.float(), -1) for x in signals.logits]
        return torch.cat(parts, dim=1)

    def _fit(self, signals: TeacherSignals) -> None:
        seed = _member(self.options["seed_router"], self.options).fit(signals)
        scores = seed.score(signals)
        x = self._inputs(signals)
        standardization = _zscore_fit(x)
        x = _zscore(x, standardization)
        num_teachers = scores.shape[1]
        uniform = torch.full((num_teachers,), 1.0 / num_teachers)
        shift = torch.zeros(num_teachers)
        if seed.shares is not None:  # the seed estimated the pool's shares (shares="estimate" and a clear structure)
            if seed.uses_shares:
                shift = (seed.shares.clamp_min(1e-6) / uniform).log()
            self.state["shares"] = seed.shares
            if seed.state.get("shares_given"):
                self.state["shares_given"] = True
        else:
            self.state["shares_note"] = seed.describe_shares().replace("not estimated (", "").rstrip(")")
        weight = bias = None
        for _ in range(int(self.options["rounds"])):
            keep = confident_rows(scores, float(self.options["share"]))
            if not keep.any():  # every row a tie: no teacher is preferred anywhere (uniform routing)
                weight, bias = torch.zeros(x.shape[1], num_teachers), torch.zeros(num_teachers)
                break
            weight, bias = self._train(x[keep], scores[keep].argmax(1), num_teachers)
            with torch.no_grad():
                scores = torch.softmax(x @ weight + bias + shift, dim=1)
        self.state.update({**standardization, "weight": weight, "bias": bias, "prior_shift": shift})
        self._log_shares()

    def _train(self, x: torch.Tensor, y: torch.Tensor, num_teachers: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.zeros(x.shape[1], num_teachers, requires_grad=True)
        bias = torch.zeros(num_teachers, requires_grad=True)
        counts = torch.bincount(y, minlength=num_teachers).float()
        class_weight = counts.sum() / (num_teachers * counts.clamp_min(1.0))
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=int(self.options["max_iter"]),
                                      line_search_fn="strong_wolfe")
        decay = float(self.options["weight_decay"])

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ weight + bias, y, weight=class_weight)
            loss = loss + decay * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        return weight.detach(), bias.detach()

    def _owner_logits(self, signals: TeacherSignals) -> torch.Tensor:
        x = self._inputs(signals)
        state = {k: self.state[k].to(x.device) for k in ("weight", "bias")}
        x = _zscore(x, {"mean": self.state["mean"], "std": self.state["std"]})
        shift = self.state.get("prior_shift")
        logits = x @ state["weight"] + state["bias"]
        return logits if shift is None else logits + shift.to(x.device)

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        if self.fallback:
            return super().score(signals)
        return torch.softmax(self.owner_logits(signals), dim=1)
