"""Routing-level evaluation from cached teacher signals (no training): the reusable part of routing.py.

For every router: fit on the unlabeled pool (the training rows; never their labels), score the pool
and the test rows, and report routing accuracy (the chosen teacher owns the gold class), the
accuracy of the routed ensemble (the chosen teacher's prediction), the cost in teacher forward
passes per example, and the fit time. The perfect router (gold owner) is the ceiling, marked as
using labels.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ki_trainer.routing import Router, build_router
from ki_trainer.strategies import TeacherSignals


def owners_and_gold(labels: Sequence[str], blocks: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Index of the teacher owning each row's gold label, and the gold label's union index."""
    union = [label for block in blocks for label in block]
    owner = {label: t for t, block in enumerate(blocks) for label in block}
    return np.array([owner[label] for label in labels]), np.array([union.index(label) for label in labels])


def routed_predictions(selected: np.ndarray, signals: TeacherSignals, blocks) -> np.ndarray:
    """Union-label prediction of the teacher each row is routed to."""
    offsets = np.cumsum([0] + [len(b) for b in blocks])
    predictions = np.zeros(len(selected), dtype=int)
    for t, logits in enumerate(signals.logits):
        own = logits.argmax(1).numpy() + offsets[t]
        predictions[selected == t] = own[selected == t]
    return predictions


def forward_passes(router, mc_samples: int, top_layers: Optional[int]) -> str:
    """Teacher forward passes per example and teacher a router costs."""
    if "mc" not in router.requires:
        return "1"
    return f"1 + {mc_samples}" + (f" (top {top_layers} layer(s))" if top_layers else "")


def evaluate_router(
    name: str,
    options: Optional[dict[str, Any]],
    pool: TeacherSignals,
    test: TeacherSignals,
    blocks,
    pool_labels: Sequence[str],
    test_labels: Sequence[str],
    mc_samples: int,
    top_layers: Optional[int],
) -> dict[str, Any]:
    """Fit ``name`` on the pool (label-free), then score pool and test rows against the gold owners."""
    router = build_router(name, options)
    start = time.perf_counter()
    if router.needs_fit:
        router.fit(pool)  # the pool's signals only: no labels, ids or text reach the fit
    fit_seconds = time.perf_counter() - start
    record: dict[str, Any] = {"method": name, "kind": "router", "options": router.options,
                              "fit_seconds": round(fit_seconds, 3),
                              "forward_passes_per_example": forward_passes(router, mc_samples, top_layers)}
    shares = getattr(router, "shares", None)  # the pool's teacher shares as the router estimated them (label-free)
    record["estimated_shares"] = None if shares is None else [round(float(v), 4) for v in shares]
    record["shares_given"] = bool(getattr(router, "state", {}).get("shares_given"))  # then the user's, not estimated
    if getattr(router, "describe_shares", None) is not None and router.needs_fit:
        record["shares_estimate"] = router.describe_shares()
    for split, signals, labels in (("pool", pool, pool_labels), ("test", test, test_labels)):
        owners, gold = owners_and_gold(labels, blocks)
        selected = router.score(signals).argmax(1).numpy()
        prefix = "" if split == "test" else "pool_"
        record[f"{prefix}routing_accuracy"] = float(np.mean(selected == owners))
        record[f"{prefix}accuracy"] = float(np.mean(routed_predictions(selected, signals, blocks) == gold))
    record["accuracy_std"] = 0.0
    record["n_seeds"] = 1
    return record


def ceiling(pool: TeacherSignals, test: TeacherSignals, blocks, pool_labels, test_labels) -> dict[str, Any]:
    """The ensemble routed by the gold owner (USES LABELS: an upper bound, not a method)."""
    record: dict[str, Any] = {"method": "perfect router (gold owner; uses labels)", "kind": "ceiling",
                              "accuracy_std": 0.0, "n_seeds": 1}
    for split, signals, labels in (("pool", pool, pool_labels), ("test", test, test_labels)):
        owners, gold = owners_and_gold(labels, blocks)
        prefix = "" if split == "test" else "pool_"
        record[f"{prefix}routing_accuracy"] = 1.0
        record[f"{prefix}accuracy"] = float(np.mean(routed_predictions(owners, signals, blocks) == gold))
    return record


def supervised_bound(pool: TeacherSignals, test: TeacherSignals, blocks, pool_labels, test_labels) -> dict[str, Any]:
    """A router TRAINED WITH THE GOLD OWNERS of every pool row (USES LABELS: a reference, not a method).

    The same logistic-regression head as ``self_training`` (over every teacher's normalised features and
    predictions), fitted on the true owners instead of pseudo-routes: how well these signals can route at
    all. A label-free router near this row has little left to gain from the same signals.
    """
    from ki_trainer.routing.pool import SelfTrainingRouter

    router = SelfTrainingRouter()
    x_pool = SelfTrainingRouter._inputs(pool)
    mean, std = x_pool.mean(0), x_pool.std(0, unbiased=False).clamp_min(1e-6)
    owners, _ = owners_and_gold(pool_labels, blocks)
    weight, bias = router._train((x_pool - mean) / std, torch.as_tensor(owners), len(blocks))
    record: dict[str, Any] = {"method": "supervised router (LR on teacher signals, fitted on gold owners; uses labels)",
                              "kind": "ceiling", "accuracy_std": 0.0, "n_seeds": 1}
    for split, signals, labels in (("pool", pool, pool_labels), ("test", test, test_labels)):
        owners, gold = owners_and_gold(labels, blocks)
        x = (SelfTrainingRouter._inputs(signals) - mean) / std
        selected = (x @ weight + bias).argmax(1).numpy()
        prefix = "" if split == "test" else "pool_"
        record[f"{prefix}routing_accuracy"] = float(np.mean(selected == owners))
        record[f"{prefix}accuracy"] = float(np.mean(routed_predictions(selected, signals, blocks) == gold))
    return record


def majority_baseline(pool: TeacherSignals, test: TeacherSignals, blocks, pool_labels, test_labels) -> dict[str, Any]:
    """Every row routed to the teacher that owns most POOL rows (USES LABELS to know which: a reference).

    On a skewed pool this is the bar a router must clear: its routing accuracy on the pool is the largest share.
    """
    pool_owners, _ = owners_and_gold(pool_labels, blocks)
    majority = int(np.bincount(pool_owners, minlength=len(blocks)).argmax())
    record: dict[str, Any] = {"method": f"majority teacher (always teacher {majority}, the pool's largest owner; uses labels)",
                              "kind": "baseline", "router": "majority", "accuracy_std": 0.0, "n_seeds": 1}
    for split, signals, labels in (("pool", pool, pool_labels), ("test", test, test_labels)):
        owners, gold = owners_and_gold(labels, blocks)
        selected = np.full(len(owners), majority)
        prefix = "" if split == "test" else "pool_"
        record[f"{prefix}routing_accuracy"] = float(np.mean(selected == owners))
        record[f"{prefix}accuracy"] = float(np.mean(routed_predictions(selected, signals, blocks) == gold))
    return record


def subsample_to_shares(labels: Sequence[str], blocks, shares: Sequence[float], seed: int = 0) -> np.ndarray:
    """Sorted indices of the largest subset of rows in which teacher t owns ``shares[t]`` of the rows.

    USES THE GOLD OWNERS, only to BUILD a benchmark pool with a known skew: the routers fitted on it never see them.
    Each teacher's rows are drawn at random (``seed``) without replacement.
    """
    shares = np.asarray(shares, dtype=float)
    if len(shares) != len(blocks) or (shares <= 0).any() or abs(shares.sum() - 1.0) > 1e-6:
        raise ValueError(f"pool shares {shares.tolist()} must be {len(blocks)} positive numbers (one per teacher) "
                         "summing to 1.")
    owners, _ = owners_and_gold(labels, blocks)
    available = np.bincount(owners, minlength=len(blocks))
    total = int(np.floor(min(available / shares)))
    counts = np.minimum(np.round(total * shares).astype(int), available)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(owners == t), size=n, replace=False) for t, n in enumerate(counts)]
    return np.sort(np.concatenate(chosen))


def select_rows(signals: TeacherSignals, index: np.ndarray) -> TeacherSignals:
    """The signals of rows ``index`` only."""
    index = torch.as_tensor(index, dtype=torch.long)
    pick = lambda x: None if x is None else x[index]  # noqa: E731
    return TeacherSignals(
        logits=[x[index] for x in signals.logits], certainty=pick(signals.certainty),
        mutual_information=pick(signals.mutual_information), top_variance=pick(signals.top_variance),
        features=None if signals.features is None else [f[index] for f in signals.features],
    )


def teacher_rows(test: TeacherSignals, blocks, test_labels) -> list[dict[str, Any]]:
    """Each teacher alone on the test rows of its own classes."""
    owners, gold = owners_and_gold(test_labels, blocks)
    offsets = np.cumsum([0] + [len(b) for b in blocks])
    rows = []
    for t, logits in enumerate(test.logits):
        mine = owners == t
        predicted = logits.argmax(1).numpy() + offsets[t]
        rows.append({"method": f"teacher_{t} (own classes: {len(blocks[t])})", "kind": "teacher",
                     "accuracy": float(np.mean(predicted[mine] == gold[mine])), "accuracy_std": 0.0,
                     "routing_accuracy": None, "n_seeds": 1})
    return rows


# L2 distance between a batch row's signals (every teacher's logits and pooled features) and its pool row's in the
# gold-owner table: the fp16 storage of the cache moves them ~0.003-0.01; distinct pool rows lie >= 0.4 apart
# (debian_sections20, 1% quantile).
TABLE_TOLERANCE = 0.05


class GoldOwnerRouter(Router):
    """The gold owner of each pool row as a router (USES LABELS: the perfect-routing ceiling of a STUDENT, as
    :func:`ceiling` is the ensemble's; benchmark only, never registered by the library). Option ``table``: a ``.pt``
    file ``{"keys": every teacher's deterministic logits and pooled features of each pool row, "owners": [rows]}``
    (:func:`gold_owner_table`); a batch's rows are found in it by these (within ``TABLE_TOLERANCE``, the cache's
    storage precision, else an error naming the rows: a row the table does not know is never routed silently)."""

    name = "gold_owner"
    requires = frozenset({"logits", "features"})
    defaults = {"table": None}

    def score(self, signals: TeacherSignals) -> torch.Tensor:
        if "keys" not in self.state:
            table = torch.load(self.options["table"])
            self.state = {"keys": table["keys"].float(), "owners": table["owners"].long()}
        query = _row_keys(signals)
        # The training step reads the cached signals at the cache's storage precision (fp16: a few hundredths away);
        # distinct texts lie far further apart. A row identical to pool rows of several owners (the same text filed
        # under two teachers' classes) gets each of their owners in proportion.
        distance = torch.cdist(query, self.state["keys"])
        nearest = distance.min(1).values
        unknown = (nearest > TABLE_TOLERANCE).nonzero().flatten().tolist()
        if unknown:
            raise ValueError(f"gold_owner: batch row(s) {unknown[:5]} are not pool rows of the table "
                             f"(nearest signals {float(nearest.max()):.3g} away).")
        match = (distance <= TABLE_TOLERANCE).float()
        owners = torch.nn.functional.one_hot(self.state["owners"], len(signals.logits)).float()
        return ((match @ owners) / match.sum(1, keepdim=True)).to(signals.logits[0].device)


def _row_keys(signals: TeacherSignals) -> torch.Tensor:
    """``[rows, sum C_t + sum D_t]``: every teacher's deterministic logits and pooled features of each row."""
    return torch.cat([x.float().cpu() for x in list(signals.logits) + list(signals.features or [])], 1)


def gold_owner_table(pool: TeacherSignals, pool_labels: Sequence[str], blocks, path) -> str:
    """Write :class:`GoldOwnerRouter`'s table for ``pool`` (USES LABELS) and return its path."""
    owners, _ = owners_and_gold(pool_labels, blocks)
    keys = _row_keys(pool)
    if len(owners) != keys.shape[0]:
        raise ValueError(f"gold_owner_table: {keys.shape[0]} pool rows of signals but {len(owners)} labels.")
    torch.save({"keys": keys, "owners": torch.as_tensor(owners)}, str(path))
    return str(path)
