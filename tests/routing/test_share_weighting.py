"""``share_weighting``: on a skewed pool, every teacher's domain counts alike in the student's loss.

A pool router that estimates the pool's teacher shares (label-free) routes by them; with ``share_weighting="balanced"``
(the default) each row's loss is also divided by its routed teacher's estimated share (mean 1 over the pool), so a
minority teacher's rows are not drowned by the majority's. Balanced pools, ``shares="equal"`` and fall-backs are
unchanged (no weights at all).
"""

import dataclasses

import pytest
import torch

from ki_trainer import KnowledgeIntegrationConfig, TeacherSignals, build_router
from ki_trainer.label_space import LabelSpace
from ki_trainer.routing.fitting import Scoring, score
from ki_trainer.strategies import get_strategy
from test_routing_shares import FEATURE_ROUTERS, owned_pool

SKEWED = [(360, 40), (380, 20), (40, 360), (340, 40, 20), (20, 300, 80)]


def teacher_mass(router, signals, owners, weighted):
    """Each TRUE owner's share of the pool's total loss weight (labels used only to check)."""
    routed = score(router, signals, "balanced" if weighted else "pool")
    weights = routed.row_weights if routed.row_weights is not None else torch.ones(len(owners))
    total = torch.stack([weights[owners == t].sum() for t in range(len(signals.logits))])
    return total / total.sum()


@pytest.mark.parametrize("counts", SKEWED)
@pytest.mark.parametrize("name", ["relative_mahalanobis", "knn_smoothing", "self_training", "consensus"])
def test_balanced_weighting_gives_every_teacher_about_the_same_weight(name, counts):
    pool, owners = owned_pool(counts)
    router = build_router(name).fit(pool)
    assert router.uses_shares, (name, router.describe_shares())
    teachers = len(counts)
    plain = teacher_mass(router, pool, owners, weighted=False)
    balanced = teacher_mass(router, pool, owners, weighted=True)
    truth = torch.tensor(counts, dtype=torch.float) / sum(counts)
    torch.testing.assert_close(plain, truth)  # unweighted: the pool's own skew
    assert float((balanced - 1.0 / teachers).abs().max()) < 0.06, (name, balanced.tolist())
    weights = router.row_weights(router.score(pool))
    assert weights.shape == (sum(counts),) and bool(torch.isfinite(weights).all()) and bool((weights > 0).all())
    assert float(weights.mean()) == pytest.approx(1.0, abs=1e-4)  # the learning rate is kept
    minority = int(torch.tensor(counts).argmin())
    assert float(weights[owners == minority].mean()) > 2.0 * float(weights[owners != minority].mean())


@pytest.mark.parametrize("counts", [(200, 200), (100, 100, 100)])
@pytest.mark.parametrize("name", FEATURE_ROUTERS + ["standardized"])
def test_balanced_pools_get_no_weights(name, counts):
    pool, _ = owned_pool(counts)
    router = build_router(name).fit(pool)
    assert router.row_weights(router.score(pool)) is None
    assert router.describe_share_weights() is None
    balanced, plain = score(router, pool, "balanced"), score(router, pool, "pool")
    assert balanced.row_weights is None
    torch.testing.assert_close(balanced.certainty, plain.certainty)


def test_equal_shares_and_fallbacks_get_no_weights():
    pool, _ = owned_pool((360, 40))
    assert build_router("relative_mahalanobis", {"shares": "equal"}).fit(pool).state.get("share_weights") is None
    tiny, _ = owned_pool((3, 3))
    with pytest.warns(UserWarning, match="Routing by 'entropy'"):
        router = build_router("relative_mahalanobis").fit(tiny)
    assert router.row_weights(router.score(tiny)) is None
    assert score(build_router("mc_entropy"), pool, "balanced").row_weights is None  # a confidence router: no estimate


def test_weights_are_kept_with_the_router_state_and_described():
    pool, _ = owned_pool((360, 40))
    router = build_router("relative_mahalanobis").fit(pool)
    again = build_router("relative_mahalanobis").load_state_dict(router.state_dict())
    torch.testing.assert_close(again.row_weights(again.score(pool)), router.row_weights(router.score(pool)))
    line = router.describe_share_weights(["A", "B"])
    low, high = router.state["share_weights"].tolist()
    assert line == f"rows routed to teacher A count x{low:.2f}, to teacher B count x{high:.2f}"
    assert low < 1.0 < high


def test_muki_multiplies_its_margin_weighted_loss_by_the_row_weights():
    space = LabelSpace([["a", "b"], ["c", "d"]])
    strategy = get_strategy("muki")(space)
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)]
    certainty = torch.softmax(torch.randn(6, 2, generator=g), 1)
    student = torch.randn(6, 4, generator=g)
    plain = strategy.compute(student, TeacherSignals(logits=logits, certainty=certainty))
    rows = torch.tensor([0.5, 0.5, 0.5, 2.0, 2.0, 0.5])
    weighted = strategy.compute(student, TeacherSignals(logits=logits, certainty=certainty, row_weights=rows))
    torch.testing.assert_close(weighted.loss, (rows * plain.weights * plain.divergence).mean())
    torch.testing.assert_close(weighted.weights, plain.weights)  # the margin weights, as logged
    assert weighted.loss.dtype == torch.float32


def test_share_weighting_is_checked_and_documented():
    with pytest.raises(ValueError, match="share_weighting must be one of"):
        Scoring(None, "none", "inverse")
    pool, _ = owned_pool((360, 40))
    with pytest.raises(ValueError, match="share_weighting must be one of"):
        score(build_router("relative_mahalanobis").fit(pool), pool, "inverse")
    with pytest.raises(ValueError, match="share_weighting must be 'balanced' or 'pool'"):
        KnowledgeIntegrationConfig(output_dir="unused", strategy="muki", share_weighting="inverse")
    field = next(f for f in dataclasses.fields(KnowledgeIntegrationConfig) if f.name == "share_weighting")
    assert field.default == "balanced" and field.metadata["choices"] == ["balanced", "pool"]
    assert "every teacher's domain counts alike" in field.metadata["help"]
