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
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..strategies.base import TeacherSignals
from .base import Router, build_router, get_router, register_router


# ---------------------------------------------------------------------- shared building blocks
def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _features(signals: TeacherSignals) -> list[torch.Tensor]:
    return [f.float() for f in signals.features]


# The z-score is written once, in routing/standardization.py (certainty_normalization uses it too).
from .standardization import zscore as _zscore  # noqa: E402
from .standardization import zscore_fit as _zscore_fit  # noqa: E402


def _probabilities(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(z / temperature, dim=1)


TIE_TOLERANCE = 1e-6  # router scores are probabilities or certainties in [0, 1]


def confident_rows(scores: torch.Tensor, share: float) -> torch.Tensor:
    """A boolean mask of the rows each teacher wins with the largest margins: the top ``share`` of the
    rows routed to each teacher (class-balanced, so a teacher that wins few rows still gets examples).

    A row whose two best scores tie (within ``TIE_TOLERANCE``) is won by no teacher: ``argmax`` would hand
    it to the teacher listed first, so the result would depend on the order of the teachers."""
    route = scores.argmax(1)
    won = torch.ones_like(route, dtype=torch.bool)
    if scores.shape[1] > 1:
        top2 = scores.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        won = margin > TIE_TOLERANCE
    else:
        margin = scores[:, 0]
    keep = torch.zeros_like(route, dtype=torch.bool)
    for t in range(scores.shape[1]):
        mine = (route == t) & won
        if mine.any():
            cut = torch.quantile(margin[mine], 1.0 - share)
            keep |= mine & (margin >= cut)
    return keep


def _pseudo_label_mask(probs: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels and the mask of the most confident ``share`` of the rows of each pseudo-class."""
    confidence, labels = probs.max(1)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    for c in labels.unique():
        mine = labels == c
        keep |= mine & (confidence >= torch.quantile(confidence[mine], 1.0 - share))
    return labels, keep


class _ZScoredRouter(Router):
    """Base for pool routers whose raw per-teacher scores are z-scored over the pool and softmaxed."""

    needs_fit = True
    requires = frozenset({"logits"})

    def raw_fit(self, signals: TeacherSignals) -> None:  # fit what raw_score needs
        pass

    def raw_score(self, signals: TeacherSignals) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, signals: TeacherSignals) -> "Router":
        self._check(signals, fitting=True)
        self.raw_fit(signals)
        raw = self.raw_score(signals)
        self.state["zscore"] = _zscore_fit(raw)
        self.fitted = True
        return self

    def zscores(self, signals: TeacherSignals) -> torch.Tensor:
        self._check(signals)
        return _zscore(self.raw_score(signals), self.state["zscore"])

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        return _probabilities(self.zscores(signals), self.options.get("temperature", 1.0))


# ---------------------------------------------------------------------- routers
@register_router
class StandardizedRouter(_ZScoredRouter):
    """A confidence router (``base``) z-scored per teacher over the pool."""

    name = "standardized"
    requires = frozenset({"logits", "mc"})
    defaults = {"base": "mc_entropy", "temperature": 1.0}

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
    defaults = {"share": 0.5, "temperature": 1.0}

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
    defaults = {"share": 1.0, "shrinkage": 0.1, "temperature": 1.0}

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


def _member_routers(names: list[str]) -> list[Router]:
    return [build_router(name) for name in names]


@register_router
class ConsensusRouter(Router):
    """Mean of several routers' pool z-scores (confidence routers are z-scored over the pool first)."""

    name = "consensus"
    needs_fit = True
    requires = frozenset({"logits", "mc", "features"})
    defaults = {"members": ["relative_mahalanobis", "prototype"], "temperature": 1.0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        kinds: set[str] = set()
        for name in self.options["members"]:
            kinds |= set(get_router(name).requires)  # unknown members fail at construction
        self.requires = frozenset(kinds)  # what THIS combination reads (the class lists the widest case)

    def fit(self, signals: TeacherSignals) -> "Router":
        self._check(signals, fitting=True)
        members = []
        for name in self.options["members"]:
            router = build_router(name)
            if isinstance(router, _ZScoredRouter):
                router.fit(signals)
                members.append({"name": name, "router": router.state_dict()})
            else:
                members.append({"name": name, "zscore": _zscore_fit(router.score(signals))})
        self.state["members"] = members
        self.fitted = True
        return self

    def zscores(self, signals: TeacherSignals) -> torch.Tensor:
        self._check(signals)
        total = None
        for member in self.state["members"]:
            router = build_router(member["name"])
            if "router" in member:
                router.load_state_dict(member["router"])
                z = router.zscores(signals)
            else:
                z = _zscore(router.score(signals), member["zscore"])
            total = z if total is None else total + z
        return total / len(self.state["members"])

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        return _probabilities(self.zscores(signals), self.options["temperature"])


def _joint_features(signals: TeacherSignals) -> torch.Tensor:
    """Every teacher's L2-normalised pooled feature, concatenated and normalised again."""
    return _normalize(torch.cat([_normalize(f) for f in _features(signals)], dim=1))


@register_router
class KNNSmoothingRouter(Router):
    """A base router's pool z-scores averaged over each row's k nearest pool neighbours."""

    name = "knn_smoothing"
    needs_fit = True
    requires = frozenset({"logits", "mc", "features"})
    defaults = {"base": "relative_mahalanobis", "neighbours": 10, "self_weight": 0.5, "temperature": 1.0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.requires = frozenset(set(build_router(self.options["base"]).requires) | {"logits", "features"})

    def fit(self, signals: TeacherSignals) -> "Router":
        self._check(signals, fitting=True)
        base = build_router(self.options["base"]).fit(signals)
        self.state["base"] = base.state_dict()
        self.state["pool_features"] = _joint_features(signals).half()
        self.state["pool_z"] = self._base_z(base, signals)
        self.fitted = True
        return self

    @staticmethod
    def _base_z(base: Router, signals: TeacherSignals) -> torch.Tensor:
        if hasattr(base, "zscores"):
            return base.zscores(signals)
        scores = base.score(signals)
        return _zscore(scores, _zscore_fit(scores))

    def zscores(self, signals: TeacherSignals) -> torch.Tensor:
        self._check(signals)
        base = build_router(self.options["base"]).load_state_dict(self.state["base"])
        own = base.zscores(signals) if hasattr(base, "zscores") else base.score(signals)
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

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        return _probabilities(self.zscores(signals), self.options["temperature"])


@register_router
class SelfTrainingRouter(Router):
    """A logistic-regression head over the teachers' features and predictions, trained on confidently
    routed pool rows and re-trained on its own confident routes for a few rounds."""

    name = "self_training"
    needs_fit = True
    requires = frozenset({"logits", "mc", "features"})
    defaults = {
        "seed_router": "relative_mahalanobis",
        "share": 0.7,
        "rounds": 2,
        "weight_decay": 1e-3,
        "max_iter": 200,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.requires = frozenset(set(build_router(self.options["seed_router"]).requires) | {"logits", "features"})

    @staticmethod
    def _inputs(signals: TeacherSignals) -> torch.Tensor:
        parts = [_normalize(f) for f in _features(signals)]
        parts += [torch.softmax(x.float(), -1) for x in signals.logits]
        return torch.cat(parts, dim=1)

    def fit(self, signals: TeacherSignals) -> "Router":
        self._check(signals, fitting=True)
        seed = build_router(self.options["seed_router"]).fit(signals)
        scores = seed.score(signals)
        x = self._inputs(signals)
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        x = (x - mean) / std
        num_teachers = scores.shape[1]
        weight = bias = None
        for _ in range(int(self.options["rounds"])):
            keep = confident_rows(scores, float(self.options["share"]))
            if not keep.any():  # every row a tie: no teacher is preferred anywhere (uniform routing)
                weight, bias = torch.zeros(x.shape[1], num_teachers), torch.zeros(num_teachers)
                break
            weight, bias = self._train(x[keep], scores[keep].argmax(1), num_teachers)
            with torch.no_grad():
                scores = torch.softmax(x @ weight + bias, dim=1)
        self.state.update({"mean": mean, "std": std, "weight": weight, "bias": bias})
        self.fitted = True
        return self

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

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        self._check(signals)
        x = self._inputs(signals)
        state = {k: self.state[k].to(x.device) for k in ("mean", "std", "weight", "bias")}
        x = (x - state["mean"]) / state["std"]
        return torch.softmax(x @ state["weight"] + state["bias"], dim=1)
