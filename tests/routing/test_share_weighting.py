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
from ki_trainer.strategies.certainty import margin_weights
from test_routing_shares import FEATURE_ROUTERS, owned_pool

SKEWED = [(360, 40), (380, 20), (40, 360), (340, 40, 20), (20, 300, 80)]


def teacher_mass(router, signals, owners, weighted, margin_weighted=True):
    """Each TRUE owner's share of the pool's total loss weight (labels used only to check); with ``margin_weighted``
    each row counts its margin too, as under MUKI's margin re-weighting."""
    routed = score(router, signals, "balanced" if weighted else "pool", margin_weighted)
    weights = routed.row_weights if routed.row_weights is not None else torch.ones(len(owners))
    if margin_weighted:
        weights = weights * margin_weights(routed.certainty)
    total = torch.stack([weights[owners == t].sum() for t in range(len(signals.logits))])
    return total / total.sum(), weights


@pytest.mark.parametrize("counts", SKEWED)
@pytest.mark.parametrize("name", ["relative_mahalanobis", "knn_smoothing", "self_training", "consensus"])
@pytest.mark.parametrize("margin_weighted", [True, False])
def test_balanced_weighting_gives_every_teacher_about_the_same_weight(name, counts, margin_weighted):
    pool, owners = owned_pool(counts)
    router = build_router(name, {"shares": "estimate"}).fit(pool)
    assert router.uses_shares, (name, router.describe_shares())
    teachers = len(counts)
    plain, plain_weights = teacher_mass(router, pool, owners, False, margin_weighted)
    balanced, weights = teacher_mass(router, pool, owners, True, margin_weighted)
    truth = torch.tensor(counts, dtype=torch.float) / sum(counts)
    minority = int(torch.tensor(counts).argmin())
    # unweighted: the pool's own skew, or worse (a minority row's margin is smaller)
    assert float(plain[minority]) <= float(truth[minority]) + 0.02, (name, plain.tolist())
    assert float((balanced - 1.0 / teachers).abs().max()) < 0.06, (name, balanced.tolist())
    assert weights.shape == (sum(counts),) and bool(torch.isfinite(weights).all()) and bool((weights > 0).all())
    # the pool's total loss weight is kept (the learning rate does not change)
    assert float(weights.sum()) == pytest.approx(float(plain_weights.sum()), rel=1e-4)
    rows = router.row_weights(router.score(pool), margin_weighted)
    assert float(rows[owners == minority].mean()) > 2.0 * float(rows[owners != minority].mean())


@pytest.mark.parametrize("counts", [(200, 200), (100, 100, 100)])
@pytest.mark.parametrize("name", FEATURE_ROUTERS + ["standardized"])
def test_balanced_pools_get_no_weights(name, counts):
    pool, _ = owned_pool(counts)
    router = build_router(name, {"shares": "estimate"}).fit(pool)
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
    for margin, key in ((True, "share_weights"), (False, "share_weights_rows")):
        line = router.describe_share_weights(["A", "B"], margin)
        low, high = router.state[key].tolist()
        assert line == f"rows routed to teacher A count x{low:.2f}, to teacher B count x{high:.2f}"
        assert low < 1.0 < high
    # the minority's rows have smaller margins (the prior pulls them to a tie): by margin they weigh more
    assert router.state["share_weights"][1] > router.state["share_weights_rows"][1]


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
    assert "the same total loss weight" in field.metadata["help"]


def test_within_teacher_kd_is_checked():
    assert KnowledgeIntegrationConfig(output_dir="unused").within_teacher_kd is None  # resolved per pool
    assert KnowledgeIntegrationConfig(output_dir="unused").strategy_options().within_teacher_weight == 0.0
    assert KnowledgeIntegrationConfig(output_dir="unused", within_teacher_kd=0.5).strategy_options(
    ).within_teacher_weight == 0.5
    with pytest.raises(ValueError, match="within_teacher_kd must be >= 0"):
        KnowledgeIntegrationConfig(output_dir="unused", within_teacher_kd=-1.0)
    with pytest.raises(ValueError, match="strategy 'vanilla_kd' does not take it"):
        KnowledgeIntegrationConfig(output_dir="unused", strategy="vanilla_kd", within_teacher_kd=1.0)


@pytest.mark.parametrize("counts,share_weighting,within_teacher_kd,expected", [
    ((360, 40), "balanced", None, 1.0),   # a skewed pool under the balanced weighting: on by default
    ((200, 200), "balanced", None, 0.0),  # a balanced pool trains as before
    ((360, 40), "pool", None, 0.0),       # the pool's own mix: as before
    ((360, 40), "balanced", 0.0, 0.0),    # explicitly off
    ((200, 200), "pool", 0.5, 0.5),       # explicitly on, whatever the pool
])
def test_within_teacher_kd_defaults_on_only_where_the_pool_is_skewed(counts, share_weighting, within_teacher_kd,
                                                                     expected):
    """The loss the trainer's strategy computes (options from the config, signals through the fitted router's
    scoring) is MUKI's plus ``expected`` x UHC's."""
    pool, _ = owned_pool(counts)
    space = LabelSpace([["a", "b", "c"], ["d", "e", "f"]], ["A", "B"])
    student = torch.randn(len(pool.logits[0]), 6, generator=torch.Generator().manual_seed(0))
    router = build_router("relative_mahalanobis").fit(pool)
    args = KnowledgeIntegrationConfig(output_dir="unused", share_weighting=share_weighting,
                                      within_teacher_kd=within_teacher_kd)
    scored = Scoring(router, "none", share_weighting, True, within_teacher_kd)(pool)
    loss = get_strategy("muki")(space, args.strategy_options()).compute(student, scored).loss
    muki = get_strategy("muki")(space).compute(student, dataclasses.replace(scored, within_teacher_weight=0.0)).loss
    uhc = get_strategy("uhc")(space).compute(student, pool).loss
    torch.testing.assert_close(loss, muki + expected * uhc)
    weights = Scoring(router, "none", share_weighting, True, within_teacher_kd).share_notes(["A", "B"])[1]
    assert (weights is not None and "matched inside its own classes" in weights) == (expected > 0 and router.uses_shares
                                                                                    and share_weighting == "balanced")


def test_the_resolved_within_teacher_weight_reaches_the_loss():
    pool, _ = owned_pool((360, 40))
    space = LabelSpace([["a", "b", "c"], ["d", "e", "f"]], ["A", "B"])
    student = torch.randn(len(pool.logits[0]), 6)
    router = build_router("relative_mahalanobis").fit(pool)
    strategy = get_strategy("muki")(space)
    on = strategy.compute(student, Scoring(router, "none", "balanced", True, None)(pool)).loss
    off = strategy.compute(student, Scoring(router, "none", "balanced", True, 0.0)(pool)).loss
    uhc = get_strategy("uhc")(space).compute(student, pool).loss
    torch.testing.assert_close(on, off + uhc)
