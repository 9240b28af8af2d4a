"""Routing on pools whose rows the teachers do NOT own in equal shares, and on pools too small to fit on.

Synthetic teachers with known owners: on a row of its own classes a teacher's pooled feature lies near one of
its class prototypes; elsewhere it falls diffusely around the teacher's mean; its logits are confident
everywhere (so confidence alone routes near chance). The pool's owner shares are set per test.
"""

import math
import warnings

import pytest
import torch

from ki_trainer import TeacherSignals, build_router
from ki_trainer.routing import describe_shares, fit_owner_mixture

FEATURE_ROUTERS = ["prototype", "relative_mahalanobis", "knn_smoothing", "self_training", "consensus"]
POOL_ROUTERS = FEATURE_ROUTERS + ["standardized"]


def owned_pool(counts, classes=3, dim=16, seed=0, tight=1.5, spread=1.5):
    """``counts[t]`` rows owned by teacher t (in that order); returns the signals and the gold owners."""
    world = torch.Generator().manual_seed(1234)  # the same teachers for every sample of rows
    prototypes = [torch.randn(classes, dim, generator=world) * 3 for _ in counts]
    g = torch.Generator().manual_seed(seed)
    owners, feats, logits = [], [[] for _ in counts], [[] for _ in counts]
    for owner, n in enumerate(counts):
        for i in range(n):
            owners.append(owner)
            for t in range(len(counts)):
                if t == owner:
                    feature, cls = prototypes[t][i % classes] + tight * torch.randn(dim, generator=g), i % classes
                else:
                    feature = prototypes[t].mean(0) + spread * torch.randn(dim, generator=g)
                    cls = int(torch.randint(0, classes, (1,), generator=g))
                row = torch.zeros(classes)
                row[cls] = 2.0 + 3.0 * float(torch.rand(1, generator=g))
                feats[t].append(feature)
                logits[t].append(row)
    logits = [torch.stack(x) for x in logits]
    certainty = torch.stack([1 - (-(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1) / math.log(classes))
                             for x in logits], 1)
    noise = torch.rand(certainty.shape, generator=g) * 0.01
    signals = TeacherSignals(logits=logits, certainty=certainty, mutual_information=noise, top_variance=noise / 10,
                             features=[torch.stack(x) for x in feats])
    return signals, torch.tensor(owners)


def accuracy(router, signals, owners):
    return float((router.score(signals).argmax(1) == owners).float().mean())


def permuted(signals, order):
    """The same rows with the teachers listed in ``order``."""
    pick = lambda xs: [xs[t] for t in order]  # noqa: E731
    return TeacherSignals(logits=pick(signals.logits), certainty=signals.certainty[:, order],
                          mutual_information=signals.mutual_information[:, order],
                          top_variance=signals.top_variance[:, order], features=pick(signals.features))


SKEWED = [(360, 40), (380, 20), (40, 360), (340, 40, 20)]
# The default (shares="auto") estimates for two teachers only; these synthetic pools test the estimate itself.
ESTIMATE = {"shares": "estimate"}


# ---------------------------------------------------------------------- the failure, reproduced
@pytest.mark.parametrize("counts", [(360, 40), (380, 20), (340, 40, 20)])
def test_equal_shares_z_scores_route_below_the_majority_baseline_on_a_skewed_pool(counts):
    """The calibration before share estimation (z-scores over the pool: ``shares="equal"``) fails on skewed pools:
    every teacher's pool mean is pulled to the majority teacher's level, and the default router routes fewer rows
    right than always answering the majority teacher."""
    pool, owners = owned_pool(counts)
    majority = max(counts) / sum(counts)
    for name in ("relative_mahalanobis", "prototype", "self_training"):
        assert accuracy(build_router(name, {"shares": "equal"}).fit(pool), pool, owners) < majority, name


def test_equal_shares_z_scores_route_well_on_a_balanced_pool():
    pool, owners = owned_pool((200, 200))
    assert accuracy(build_router("relative_mahalanobis", {"shares": "equal"}).fit(pool), pool, owners) > 0.95


# ---------------------------------------------------------------------- the fix
@pytest.mark.parametrize("counts", SKEWED)
@pytest.mark.parametrize("name", FEATURE_ROUTERS)
def test_share_aware_routers_beat_the_majority_and_mc_entropy_on_skewed_pools(name, counts):
    pool, owners = owned_pool(counts)
    test, test_owners = owned_pool(counts, seed=1)
    majority = max(counts) / sum(counts)
    router = build_router(name, ESTIMATE).fit(pool)
    mc = accuracy(build_router("mc_entropy"), pool, owners)
    assert accuracy(router, pool, owners) >= max(majority, mc) + 0.02, name
    assert accuracy(router, test, test_owners) >= majority - 0.01, name  # unseen rows of the same mixture
    torch.testing.assert_close(router.score(test).sum(1), torch.ones(len(test_owners)))


@pytest.mark.parametrize("counts", [(200, 200), (100, 100, 100), (150, 150, 50, 50)])
@pytest.mark.parametrize("name", FEATURE_ROUTERS)
def test_share_estimation_keeps_balanced_and_mildly_skewed_pools_routed(name, counts):
    """Balanced pools route as before (the estimate lies within min_skew of equal shares: the same z-scores); a
    mildly skewed pool of four teachers loses at most 2 points to the z-scores that happen to suit it."""
    pool, owners = owned_pool(counts)
    equal = build_router(name, {"shares": "equal"}).fit(pool)
    estimate = build_router(name, ESTIMATE).fit(pool)
    if len(set(counts)) == 1:
        assert not estimate.uses_shares
        torch.testing.assert_close(estimate.score(pool), equal.score(pool))
    assert accuracy(estimate, pool, owners) >= accuracy(equal, pool, owners) - 0.02, name


@pytest.mark.parametrize("counts", [(200, 200), (320, 80), (360, 40), (380, 20), (20, 380), (340, 40, 20),
                                    (150, 150, 50, 50)])
def test_estimated_shares_match_the_true_owner_shares(counts):
    pool, _ = owned_pool(counts)
    truth = torch.tensor(counts, dtype=torch.float) / sum(counts)
    for name in ("relative_mahalanobis", "knn_smoothing", "consensus", "self_training"):
        router = build_router(name, ESTIMATE).fit(pool)
        assert router.shares is not None, (name, router.shares_note)
        assert float(router.shares.sum()) == pytest.approx(1.0, abs=1e-5)
        assert float((router.shares - truth).abs().max()) < 0.03, (name, router.shares.tolist(), truth.tolist())


def test_the_estimate_is_reported_in_words_and_kept_in_the_router_state(caplog):
    pool, _ = owned_pool((360, 40))
    router = build_router("relative_mahalanobis").fit(pool)
    assert router.describe_shares(["A", "B"]) == "the pool looks 90% teacher A, 10% teacher B"
    assert router.describe_shares() == "the pool looks 90% teacher 0, 10% teacher 1"
    again = build_router("relative_mahalanobis").load_state_dict(router.state_dict())
    torch.testing.assert_close(again.shares, router.shares)
    torch.testing.assert_close(again.score(pool), router.score(pool))
    assert describe_shares([0.876, 0.124], ["en", "it"]) == "the pool looks 88% teacher en, 12% teacher it"
    with pytest.raises(ValueError, match="2 shares but 3 teacher names"):
        describe_shares([0.5, 0.5], ["a", "b", "c"])


def test_equal_shares_option_keeps_the_pool_z_scores():
    pool, _ = owned_pool((360, 40))
    router = build_router("relative_mahalanobis", {"shares": "equal"}).fit(pool)
    assert router.shares is None and router.shares_note == "shares='equal'"
    torch.testing.assert_close(router.score(pool), torch.softmax(router.zscores(pool), 1))
    with pytest.raises(ValueError, match="shares must be one of"):
        build_router("prototype", {"shares": "guess"})


@pytest.mark.parametrize("name", POOL_ROUTERS)
def test_routers_do_not_depend_on_the_order_of_the_teachers(name):
    """Listing the teachers in another order permutes the scores and the shares, nothing else."""
    pool, _ = owned_pool((300, 60, 40))
    order = [2, 0, 1]
    router = build_router(name).fit(pool)
    other = build_router(name).fit(permuted(pool, order))
    torch.testing.assert_close(other.score(permuted(pool, order)), router.score(pool)[:, order], atol=2e-4, rtol=1e-3)
    if router.shares is not None:
        torch.testing.assert_close(other.shares, router.shares[order], atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------- the mixture itself
def test_owner_mixture_recovers_known_shares_and_levels():
    g = torch.Generator().manual_seed(0)
    owners = (torch.rand(2000, generator=g) < 0.15).long()  # 85% teacher 0
    raw = torch.randn(2000, 2, generator=g)
    raw[torch.arange(2000), owners] += 3.0  # the owner's score is 3 higher
    fit = fit_owner_mixture(raw)
    assert fit["accepted"], fit["reason"]
    torch.testing.assert_close(fit["shares"], torch.tensor([0.85, 0.15]), atol=0.02, rtol=0)
    lift = fit["means"].diagonal() - fit["means"].flip(0).diagonal()  # own component minus the other, per teacher
    torch.testing.assert_close(lift, torch.tensor([3.0, 3.0]) / raw.std(0), atol=0.15, rtol=0)
    swapped = fit_owner_mixture(raw.flip(1))  # the teachers' order does not matter
    torch.testing.assert_close(swapped["shares"], fit["shares"].flip(0), atol=1e-4, rtol=0)


def test_owner_mixture_refuses_scores_without_owner_structure():
    raw = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    fit = fit_owner_mixture(raw)
    assert not fit["accepted"] and "no owner structure" in fit["reason"]


def test_owner_mixture_rejects_non_finite_scores():
    raw = torch.randn(10, 2)
    raw[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"not finite \(pool rows \[3\]"):
        fit_owner_mixture(raw)


# ---------------------------------------------------------------------- tiny pools
@pytest.mark.parametrize("name", POOL_ROUTERS)
def test_a_pool_too_small_to_fit_on_falls_back_to_a_router_without_fit(name):
    pool, _ = owned_pool((2, 1))
    with pytest.warns(UserWarning, match=r"given 3 pool row\(s\) to fit on; it needs at least 20 .*'entropy'"):
        router = build_router(name).fit(pool)
    assert router.fitted and router.fallback == "entropy"
    test, _ = owned_pool((30, 30), seed=1)
    torch.testing.assert_close(router.score(test), build_router("entropy").score(test))
    assert "3 pool row(s) seen, 20 needed" in router.describe_shares()
    again = build_router(name).load_state_dict(router.state_dict())  # the fall-back travels with the state
    torch.testing.assert_close(again.score(test), router.score(test))


def test_the_fallback_routes_by_what_each_teacher_says_not_by_its_position():
    """No 0.5/0.5 ties on a tiny pool: the fall-back scores each teacher's own certainty, so a confident teacher
    wins whatever its place in the list, and the margins a student is weighted by are not zero."""
    logits = [torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.0]]), torch.tensor([[0.1, 0.0, 0.0], [0.0, 5.0, 0.0]])]
    signals = TeacherSignals(logits=logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        router = build_router("relative_mahalanobis", {"min_rows_per_teacher": 2})
        router.requires = frozenset({"logits"})  # this pool carries no features: the fall-back does not read them
        router.fit(signals)
    scores = router.score(signals)
    assert scores.argmax(1).tolist() == [0, 1]
    assert bool(((scores[:, 0] - scores[:, 1]).abs() > 0.1).all())
    swapped = router.score(TeacherSignals(logits=logits[::-1]))
    torch.testing.assert_close(swapped, scores.flip(1))


def test_min_rows_per_teacher_is_an_option():
    pool, _ = owned_pool((3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back warning
        router = build_router("relative_mahalanobis", {"min_rows_per_teacher": 3}).fit(pool)
    assert router.fallback is None
    with pytest.raises(ValueError, match="min_rows_per_teacher must be >= 1"):
        build_router("relative_mahalanobis", {"min_rows_per_teacher": 0})


# ---------------------------------------------------------------------- in the trainer
def _trainer(tmp_path, trained_teachers, rows, **kw):
    from conftest import build_tokenizer, tiny_bert

    from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher

    tok = build_tokenizer()
    teachers = [Teacher(model, tokenizer=own, name=name) for (model, own), name in zip(trained_teachers, ["A", "B"])]
    args = KnowledgeIntegrationConfig(
        output_dir=str(tmp_path / "out"), strategy="muki", signal_source="cached", signal_cache_dir=str(tmp_path / "c"),
        max_steps=2, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[], use_cpu=True, disable_tqdm=True,
        save_strategy="no", seed=0, **kw)
    return KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), seed=3), args=args, teachers=teachers,
                                       train_dataset=rows, processing_class=tok)


@pytest.fixture
def pool_rows():
    from conftest import make_rows
    from datasets import Dataset

    rows = make_rows(8, seed=4)  # 32 rows, 4 classes, 2 per teacher
    return Dataset.from_list([{"id": f"ex{i}", "text": r["text"], "label": r["label"]} for i, r in enumerate(rows)])


def test_the_trainer_logs_the_estimate_with_teacher_names_and_the_card_shows_it(tmp_path, trained_teachers,
                                                                                pool_rows):
    from transformers.utils import logging as hf_logging

    from ki_trainer.model_card import router_fit_summary

    trainer = _trainer(tmp_path, trained_teachers, pool_rows)
    assert trainer.router.name == "relative_mahalanobis"
    records = []
    handler = type("H", (__import__("logging").Handler,), {"emit": lambda self, r: records.append(r.getMessage())})()
    logger = hf_logging.get_logger("ki_trainer.trainer")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel("INFO")
    try:
        trainer.fit_router()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    line = next(m for m in records if "fitted on 32 unlabeled rows" in m)
    expected = trainer.router.describe_shares(["A", "B"])
    weights = trainer.router.describe_share_weights(["A", "B"])  # share_weighting="balanced" (the default)
    if weights is None:
        assert line.endswith(f"; {expected}.") and ("teacher A" in expected or "not estimated" in expected)
    else:
        assert line.endswith(f"; {expected}; share_weighting='balanced': {weights} in the student's loss, plus 1 x "
                             "each teacher matched inside its own classes on every row.")  # within_teacher_kd=None
        assert weights.startswith("rows routed to teacher A count x")
    summary = router_fit_summary(trainer)
    assert summary.startswith(f"fitted on 32 unlabeled pool rows; {expected}")
    assert (weights is None) == (summary == f"fitted on 32 unlabeled pool rows; {expected}")
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- router fit: {summary}" in card


def test_router_fit_rows_2_falls_back_with_a_warning_instead_of_tied_scores(tmp_path, trained_teachers, pool_rows):
    """The issue's tiny pool: router_fit_rows=2 used to fit two rows and score every row 0.5/0.5."""
    trainer = _trainer(tmp_path, trained_teachers, pool_rows, router_fit_rows=2)
    with pytest.warns(UserWarning, match=r"given 2 pool row\(s\) to fit on; it needs at least 20"):
        trainer.fit_router()
    assert trainer.router.fallback == "entropy"
    signals = trainer.signal_cache.lookup([str(i) for i in pool_rows["id"]], None)
    scores = trainer.router.score(signals)
    torch.testing.assert_close(scores, build_router("entropy").score(signals))
    assert float((scores[:, 0] - scores[:, 1]).abs().min()) > 0  # no exact ties: every row has a margin
    trainer.save_model()
    assert "not estimated: 2 pool row(s) seen, 20 needed; routed by 'entropy'" in (tmp_path / "out" / "README.md").read_text()


def test_share_weighting_reaches_the_trainer_step_only_when_balanced(tmp_path, trained_teachers, pool_rows):
    """The tiny pool reads skewed (see the log test above): 'balanced' puts row weights on the step's signals, 'pool'
    none; the card names the weights only when they are applied."""
    from ki_trainer.model_card import router_fit_summary

    found = {}
    for weighting in ("balanced", "pool"):
        trainer = _trainer(tmp_path / weighting, trained_teachers, pool_rows, share_weighting=weighting)
        trainer.fit_router()
        signals = trainer.scoring(trainer.signal_cache.lookup([str(i) for i in pool_rows["id"]], None))
        found[weighting] = (signals.row_weights, router_fit_summary(trainer), trainer.router)
    weights, summary, router = found["balanced"]
    assert router.uses_shares, router.describe_shares()
    torch.testing.assert_close(weights, router.row_weights(router.score(
        trainer.signal_cache.lookup([str(i) for i in pool_rows["id"]], None))))
    from ki_trainer.strategies.certainty import margin_weights  # MUKI's margin re-weighting is on: kept in total

    margins = margin_weights(router.score(trainer.signal_cache.lookup([str(i) for i in pool_rows["id"]], None)))
    assert float((weights * margins).sum()) == pytest.approx(float(margins.sum()), rel=1e-4)
    assert "in the student's loss" in summary
    assert found["pool"][0] is None and "in the student's loss" not in found["pool"][1]


@pytest.mark.parametrize("counts", [(340, 40, 20), (150, 150, 50, 50), (100, 100, 100)])
def test_the_default_assumes_equal_shares_for_more_than_two_teachers_and_says_why(counts):
    """``shares="auto"`` (the default) estimates for two teachers only: with four teachers on a real pool the estimate
    misread a balanced pool (docs/routing.md). More teachers route exactly as ``shares="equal"``; the note says why and
    how to estimate anyway."""
    pool, _ = owned_pool(counts)
    router = build_router("relative_mahalanobis").fit(pool)
    assert router.shares is None and not router.uses_shares
    assert "shares='estimate' estimates anyway" in router.describe_shares()
    torch.testing.assert_close(router.score(pool), build_router("relative_mahalanobis", {"shares": "equal"}).fit(pool).score(pool))
    assert build_router("relative_mahalanobis", {"shares": "estimate"}).fit(pool).shares is not None


def test_the_default_estimates_the_shares_of_two_teachers():
    pool, _ = owned_pool((360, 40))
    router = build_router("relative_mahalanobis").fit(pool)
    assert router.options["shares"] == "auto" and router.uses_shares
    assert float(router.shares[0]) == pytest.approx(0.9, abs=0.03)


# ---------------------------------------------------------------------- shares the user knows
@pytest.mark.parametrize("counts", [(340, 40, 20), (280, 40, 40, 40), (360, 40)])
@pytest.mark.parametrize("name", ["relative_mahalanobis", "knn_smoothing", "consensus", "self_training"])
def test_given_shares_are_the_routing_prior_for_any_number_of_teachers(name, counts):
    """``router_options={"shares": [...]}``: the pool's shares as the user knows them (fractions or row counts) are the
    prior, where the default assumes equal shares (3+ teachers) or estimates them (2); a dominated pool of three or
    four teachers then routes above the majority baseline, which the equal-shares default does not."""
    pool, owners = owned_pool(counts)
    majority = max(counts) / sum(counts)
    router = build_router(name, {"shares": list(counts)}).fit(pool)  # row counts: normalised
    assert router.uses_shares and router.options["shares"] == pytest.approx([c / sum(counts) for c in counts])
    torch.testing.assert_close(router.shares, torch.tensor(counts, dtype=torch.float) / sum(counts))
    assert accuracy(router, pool, owners) >= majority + 0.02, name
    if len(counts) > 2:
        assert accuracy(build_router(name).fit(pool), pool, owners) < accuracy(router, pool, owners), name
    assert "(as given: router_options shares)" in router.describe_shares(), name


@pytest.mark.parametrize("name", ["relative_mahalanobis", "consensus", "self_training"])
def test_given_shares_survive_a_saved_router_state_and_balanced_ones_weight_nothing(name, tmp_path):
    """Near-equal given shares are still the prior (routing as given, 'as given' on the card after a resume) but not
    a skewed pool: no share weights, no automatic within_teacher_kd."""
    from ki_trainer.routing.fitting import load_router_state, save_router_state, within_teacher_weight

    pool, _ = owned_pool((210, 190))
    router = build_router(name, {"shares": [210, 190]}).fit(pool)
    assert router.uses_shares and not router.skewed
    assert router.row_weights(router.score(pool)) is None
    assert within_teacher_weight(router, "balanced", None) == 0.0
    save_router_state(router, str(tmp_path))
    again = build_router(name)  # the saved options (the given shares) come back with the state
    assert load_router_state(again, str(tmp_path))
    assert again.uses_shares and "(as given: router_options shares)" in again.describe_shares()
    torch.testing.assert_close(again.score(pool), router.score(pool))
    skewed, _ = owned_pool((360, 40))
    assert build_router(name, {"shares": [0.9, 0.1]}).fit(skewed).skewed


def test_given_shares_of_the_wrong_length_fail_when_the_trainer_is_built(tmp_path, trained_teachers, pool_rows):
    with pytest.raises(ValueError, match="3 shares given for 2 teachers"):
        _trainer(tmp_path, trained_teachers, pool_rows, router="relative_mahalanobis",
                 router_options={"shares": [0.5, 0.3, 0.2]})


def test_a_fallback_says_the_given_shares_are_not_used():
    pool, _ = owned_pool((3, 3))
    with pytest.warns(UserWarning, match="The shares given in router_options are not used"):
        build_router("relative_mahalanobis", {"shares": [0.5, 0.5]}).fit(pool)


def test_given_shares_are_reported_as_given_and_checked_early():
    pool, _ = owned_pool((360, 40))
    router = build_router("relative_mahalanobis", {"shares": [0.9, 0.1]}).fit(pool)
    assert router.describe_shares(["A", "B"]) == "the pool is 90% teacher A, 10% teacher B (as given: router_options shares)"
    for bad in ([0.5, -0.5], [1.0], [0.5, float("nan")], ["a", "b"], 3):
        with pytest.raises(ValueError, match="shares must be|given shares must be"):
            build_router("relative_mahalanobis", {"shares": bad})
    with pytest.raises(ValueError, match="3 shares given for 2 teachers"):
        build_router("relative_mahalanobis", {"shares": [0.5, 0.3, 0.2]}).fit(pool)


def test_the_config_checks_given_shares_before_any_teacher_runs():
    from ki_trainer import KnowledgeIntegrationConfig

    config = KnowledgeIntegrationConfig(output_dir="unused", router="relative_mahalanobis", signal_source="cached",
                                        router_options='{"shares": [7000, 3000]}')
    assert config.router_options == {"shares": [7000, 3000]}
    with pytest.raises(ValueError, match="given shares must be"):
        KnowledgeIntegrationConfig(output_dir="unused", router="relative_mahalanobis", signal_source="cached",
                                   router_options={"shares": [1, 0]})


def test_an_estimate_used_as_the_prior_is_a_warning_that_points_to_given_shares():
    from transformers.utils import logging as hf_logging

    records = []
    handler = type("H", (__import__("logging").Handler,), {"emit": lambda self, r: records.append((r.levelname, r.getMessage()))})()
    logger = hf_logging.get_logger("ki_trainer.routing.transductive")
    logger.addHandler(handler)
    try:
        skewed, _ = owned_pool((360, 40))
        build_router("relative_mahalanobis").fit(skewed)
        build_router("relative_mahalanobis", {"shares": [0.9, 0.1]}).fit(skewed)
        build_router("relative_mahalanobis").fit(owned_pool((200, 200))[0])
        build_router("consensus").fit(skewed)  # one warning from the combination, none from its members
    finally:
        logger.removeHandler(handler)
    warned = [m for level, m in records if level == "WARNING"]
    assert len(warned) == 2 and "the pool looks 90% teacher 0, 10% teacher 1, estimated label-free" in warned[0]
    assert "router_options={'shares': [...]}" in warned[0] and warned[1].startswith("Router 'consensus'")
