"""Routers (competence estimators): known answers on synthetic signals, registry, fit/resume, no labels."""

import math
import os

import pytest
import torch
from conftest import build_tokenizer, make_rows, tiny_bert
from datasets import Dataset

from ki_trainer import (
    KnowledgeIntegrationConfig,
    KnowledgeIntegrationTrainer,
    Teacher,
    TeacherSignals,
    build_router,
    list_routers,
    register_router,
)
from ki_trainer.numerics import mc_statistics
from ki_trainer.routing import ROUTERS, Router, confident_rows

CONFIDENCE = ["energy", "entropy", "max_prob", "mc_entropy", "mc_mutual_information", "mc_variance"]
POOL = ["consensus", "knn_smoothing", "prototype", "relative_mahalanobis", "self_training", "standardized"]


def test_registry_lists_every_router_and_rejects_unknown_ones():
    assert set(CONFIDENCE + POOL) <= set(list_routers())
    with pytest.raises(ValueError, match="Unknown router 'nope'"):
        build_router("nope")
    with pytest.raises(ValueError, match="has no option"):
        build_router("prototype", {"nope": 1})


def test_adding_a_router_is_adding_one_class():
    @register_router
    class First(Router):
        name = "first_teacher_test_only"

        def score(self, signals):
            out = torch.zeros(signals.batch_size, len(signals.logits))
            out[:, 0] = 1.0
            return out

    try:
        assert "first_teacher_test_only" in list_routers()
        config = KnowledgeIntegrationConfig(output_dir="unused", router="first_teacher_test_only", report_to=[])
        assert config.resolved_router() == "first_teacher_test_only"
    finally:
        ROUTERS.pop("first_teacher_test_only")


# ---------------------------------------------------------------------- confidence routers
def confident_signals():
    """Row 0: teacher 0 peaked, teacher 1 flat; row 1: the reverse."""
    peaked, flat = [6.0, 0.0, 0.0], [0.1, 0.0, -0.1]
    logits = [torch.tensor([peaked, flat]), torch.tensor([flat, peaked])]
    mc = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    mutual_information = torch.tensor([[0.01, 0.4], [0.4, 0.01]])
    top_variance = torch.tensor([[0.001, 0.05], [0.05, 0.001]])
    return TeacherSignals(logits=logits, certainty=mc, mutual_information=mutual_information, top_variance=top_variance)


@pytest.mark.parametrize("name", CONFIDENCE)
def test_confidence_routers_pick_the_confident_teacher(name):
    scores = build_router(name).score(confident_signals())
    assert scores.shape == (2, 2)
    assert scores.argmax(1).tolist() == [0, 1]
    assert bool(((scores >= 0) & (scores <= 1)).all())


def test_mc_entropy_router_is_mukis_certainty_unchanged():
    signals = confident_signals()
    assert torch.equal(build_router("mc_entropy").score(signals), signals.certainty)


def test_mc_statistics_match_a_hand_computation():
    # one example, K=2 samples over 2 classes: p1 = (1, 0), p2 = (0, 1) -> mean (0.5, 0.5)
    big = 50.0
    logits = torch.tensor([[big, -big], [-big, big]])
    stats = mc_statistics(logits, 2)
    torch.testing.assert_close(stats["mean"], torch.tensor([[0.5, 0.5]]))
    # H(mean) = log 2, E H(p_k) = 0 -> MI = log 2 / log 2 = 1
    torch.testing.assert_close(stats["mutual_information"], torch.tensor([1.0]))
    # top class 0: samples 1 and 0 -> variance 0.25
    torch.testing.assert_close(stats["top_variance"], torch.tensor([0.25]))
    # identical samples: no epistemic uncertainty
    same = mc_statistics(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 2)
    assert float(same["mutual_information"]) == pytest.approx(0.0, abs=1e-6)
    assert float(same["top_variance"]) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------- pool routers
def synthetic_pool(n_per_class=60, dim=16, seed=0):
    """Two teachers, two classes each. A teacher's features cluster tightly around its class prototypes on
    rows of its own classes and fall between them, diffusely, elsewhere (near the teacher's overall mean, as
    with real fine-tuned encoders on text they do not know); its logits are confident EVERYWHERE (confidently wrong
    out of its domain), so confidence routers are near chance and feature routers are not."""
    world = torch.Generator().manual_seed(1234)  # the same teachers (prototypes) for every sample of rows
    prototypes = [torch.randn(2, dim, generator=world) * 3 for _ in range(2)]
    g = torch.Generator().manual_seed(seed)
    owners, feats, logits = [], [[], []], [[], []]
    for owner in range(2):
        for c in range(2):
            for _ in range(n_per_class):
                owners.append(owner)
                for t in range(2):
                    if t == owner:
                        f = prototypes[t][c] + 0.5 * torch.randn(dim, generator=g)
                        cls = c
                    else:
                        f = prototypes[t].mean(0) + 1.5 * torch.randn(dim, generator=g)
                        cls = int(torch.randint(0, 2, (1,), generator=g))
                    strength = 2.0 + 3.0 * float(torch.rand(1, generator=g))
                    row = torch.zeros(2)
                    row[cls] = strength
                    feats[t].append(f)
                    logits[t].append(row)
    logits = [torch.stack(x) for x in logits]
    certainty = torch.stack([1 - (-(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1) / math.log(2)) for x in logits], 1)
    noise = torch.rand(certainty.shape, generator=g) * 0.01
    signals = TeacherSignals(
        logits=logits,
        certainty=certainty,
        mutual_information=noise,
        top_variance=noise / 10,
        features=[torch.stack(x) for x in feats],
    )
    return signals, torch.tensor(owners)


def routing_accuracy(router, signals, owners):
    return float((router.score(signals).argmax(1) == owners).float().mean())


@pytest.mark.parametrize("name", ["prototype", "relative_mahalanobis", "consensus", "knn_smoothing"])
def test_feature_routers_find_the_owner_where_confidence_cannot(name):
    pool, owners = synthetic_pool(seed=0)
    test, test_owners = synthetic_pool(seed=1)
    baseline = routing_accuracy(build_router("entropy"), test, test_owners)
    router = build_router(name).fit(pool)
    accuracy = routing_accuracy(router, test, test_owners)
    assert baseline < 0.7  # the synthetic teachers are confidently wrong out of their domain
    assert accuracy >= 0.9, (name, accuracy)
    scores = router.score(test)
    torch.testing.assert_close(scores.sum(1), torch.ones(len(scores)))  # probabilities over teachers


def test_self_training_router_corrects_a_noisy_seed_where_domains_are_linearly_separable():
    """Rows of teacher t's domain carry a domain direction in every teacher's features (linearly separable),
    while the seed router (standardized MC certainty) is right only ~70% of the time: the head trained on the
    seed's confident rows routes better than its seed."""
    g = torch.Generator().manual_seed(0)
    n, dim = 300, 12
    owners = torch.arange(n) % 2
    direction = torch.randn(dim, generator=g)
    features = [torch.randn(n, dim, generator=g) + torch.outer(owners.float() * 2 - 1, direction) * 0.8 for _ in range(2)]
    right = torch.rand(n, generator=g) < 0.7
    winner = torch.where(right, owners, 1 - owners)
    certainty = torch.rand(n, 2, generator=g) * 0.3
    certainty[torch.arange(n), winner] += 0.5 + 0.2 * torch.rand(n, generator=g)
    signals = TeacherSignals(logits=[torch.zeros(n, 2), torch.zeros(n, 2)], certainty=certainty,
                             mutual_information=torch.zeros(n, 2), top_variance=torch.zeros(n, 2), features=features)
    seed = float((build_router("mc_entropy").score(signals).argmax(1) == owners).float().mean())
    router = build_router("self_training", {"seed_router": "standardized", "share": 0.5}).fit(signals)
    learned = float((router.score(signals).argmax(1) == owners).float().mean())
    assert seed < 0.75
    assert learned >= seed + 0.1, (seed, learned)


def test_transductive_router_must_be_fitted_first():
    test, _ = synthetic_pool(seed=1)
    with pytest.raises(RuntimeError, match="fit it on the unlabeled pool first"):
        build_router("self_training").score(test)


@pytest.mark.parametrize("name", ["consensus", "knn_smoothing", "relative_mahalanobis", "prototype"])
def test_every_unfitted_transductive_router_says_to_fit_it_first(name):
    test, _ = synthetic_pool(seed=1)
    with pytest.raises(RuntimeError, match="fit it on the unlabeled pool first"):
        build_router(name).score(test)


def test_router_needing_features_says_so():
    signals = confident_signals()
    with pytest.raises(ValueError, match="pooled teacher features"):
        build_router("prototype").fit(signals)


def test_standardized_router_compares_each_teacher_with_itself():
    # teacher 1 is always more certain in absolute terms, but relative to itself teacher 0 wins row 0
    certainty = torch.tensor([[0.50, 0.60], [0.10, 0.95], [0.12, 0.90], [0.11, 0.97]])
    signals = TeacherSignals(logits=[torch.zeros(4, 2), torch.zeros(4, 2)], certainty=certainty,
                             mutual_information=torch.zeros(4, 2), top_variance=torch.zeros(4, 2))
    assert build_router("mc_entropy").score(signals).argmax(1).tolist() == [1, 1, 1, 1]
    router = build_router("standardized", {"min_rows_per_teacher": 2}).fit(signals)  # 4 rows: allow the fit
    assert router.fallback is None and router.score(signals).argmax(1).tolist()[0] == 0


def test_confident_rows_are_balanced_per_teacher():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45], [0.3, 0.7], [0.45, 0.55]])
    keep = confident_rows(scores, 0.5)
    assert keep.tolist() == [True, True, False, False, True, False]


def test_router_state_round_trip_scores_identically():
    pool, _ = synthetic_pool(seed=0)
    test, _ = synthetic_pool(seed=1)
    router = build_router("self_training").fit(pool)
    state = router.state_dict()
    again = build_router("self_training").load_state_dict(state)
    torch.testing.assert_close(again.score(test), router.score(test))


# ---------------------------------------------------------------------- in the trainer
@pytest.fixture
def pool_rows():
    rows = make_rows(8, seed=4)
    return Dataset.from_list([{"id": f"ex{i}", "text": r["text"], "label": r["label"]} for i, r in enumerate(rows)])


def make_trainer(tmp_path, trained_teachers, dataset, router="self_training", mode="cached", **kw):
    tok = build_tokenizer()
    teachers = [Teacher(model, tokenizer=own, name=f"t{i}") for i, (model, own) in enumerate(trained_teachers)]
    defaults = dict(
        output_dir=str(tmp_path / "out"), strategy="muki", router=router, signal_source=mode,
        signal_cache_dir=str(tmp_path / "cache"), max_steps=4, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, learning_rate=1e-3, mc_samples=4, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no", seed=0,
    )
    defaults.update(kw)
    return KnowledgeIntegrationTrainer(
        model=tiny_bert(4, len(tok), seed=3), args=KnowledgeIntegrationConfig(**defaults), teachers=teachers,
        train_dataset=dataset, processing_class=tok,
    )


def test_default_router_depends_on_the_signal_mode():
    """muki: relative_mahalanobis with cached signals (fitted on the pool), MUKI's mc_entropy on the fly."""
    def resolved(**kw):
        return KnowledgeIntegrationConfig(output_dir="unused", report_to=[], **kw).resolved_router()

    assert resolved() == "mc_entropy"
    assert resolved(signal_source="cached") == "relative_mahalanobis"
    assert resolved(signal_source="cached", router="mc_entropy") == "mc_entropy"
    assert resolved(strategy="entropy", signal_source="cached") == "entropy"
    assert resolved(strategy="vanilla_kd", signal_source="cached") is None


def test_model_card_names_the_router_the_run_used():
    from ki_trainer.model_card import _router

    def card(**kw):
        return _router(KnowledgeIntegrationConfig(output_dir="unused", report_to=[], **kw))

    assert card(signal_source="cached") == "relative_mahalanobis (the default of strategy 'muki')"
    assert card() == "mc_entropy (the default of strategy 'muki')"
    assert card(router="energy") == "energy"
    assert card(strategy="vanilla_kd").startswith("none")
    from ki_trainer.model_card import _strategy_settings

    settings = _strategy_settings(KnowledgeIntegrationConfig(
        output_dir="unused", report_to=[], signal_source="cached", router_fit_rows=500))
    assert settings["router_fit_rows"] == 500 and "router_options" in settings  # every router field is on the card


def test_default_cached_muki_fits_the_feature_router(tmp_path, trained_teachers, pool_rows):
    trainer = make_trainer(tmp_path, trained_teachers, pool_rows, router=None)
    assert trainer.router.name == "relative_mahalanobis"
    trainer.train()
    assert trainer.router.fitted and (tmp_path / "out" / "router_state.pt").is_file()
    assert "features_0" in trainer.signal_cache.tensors
    metrics = trainer.evaluate(pool_rows)
    assert math.isfinite(metrics["eval_loss"]) and "eval_teacher_selection_accuracy" in metrics
    live = trainer.evaluate(pool_rows.remove_columns("id"))  # rows without ids: queried live, scored by the same fit
    assert math.isfinite(live["eval_loss"]) and "eval_teacher_selection_accuracy" in live


def test_transductive_router_needs_cached_signals():
    with pytest.raises(ValueError, match="signal_source='cached'"):
        KnowledgeIntegrationConfig(output_dir="unused", router="self_training", report_to=[])


def test_router_needs_a_certainty_strategy():
    with pytest.raises(ValueError, match="does not select teachers"):
        KnowledgeIntegrationConfig(output_dir="unused", strategy="vanilla_kd", router="mc_entropy", report_to=[])


def test_router_options_from_json_text_are_validated():
    config = KnowledgeIntegrationConfig(output_dir="unused", router="energy", router_options="{}", report_to=[])
    assert config.router_options == {}
    with pytest.raises(ValueError, match="has no option"):
        KnowledgeIntegrationConfig(output_dir="unused", router="energy", router_options='{"k": 3}', report_to=[])
    with pytest.raises(ValueError, match="JSON object"):
        KnowledgeIntegrationConfig(output_dir="unused", router="energy", router_options="{k", report_to=[])


def test_no_gold_label_reaches_the_router_fit(tmp_path, trained_teachers, pool_rows):
    """Fitting on the same pool with its labels shuffled, or removed, gives the same router."""
    fits = []
    variants = [
        pool_rows,
        pool_rows.map(lambda r, i: {"label": ["alpha", "beta", "gamma", "delta"][i % 4]}, with_indices=True),
        pool_rows.remove_columns("label"),
    ]
    for i, dataset in enumerate(variants):
        trainer = make_trainer(tmp_path / str(i), trained_teachers, dataset)
        trainer.fit_router()
        fits.append(trainer.router.state_dict()["state"])
    for other in fits[1:]:
        for key in ("weight", "bias", "mean", "std"):
            torch.testing.assert_close(other[key], fits[0][key])


def test_fit_is_saved_and_a_resumed_run_scores_with_the_same_fit(tmp_path, trained_teachers, pool_rows):
    trainer = make_trainer(tmp_path, trained_teachers, pool_rows, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "router_state.pt").is_file()
    assert (tmp_path / "out" / "router_state.pt").is_file()
    fitted = trainer.router.state_dict()["state"]

    resumed = make_trainer(tmp_path, trained_teachers, pool_rows, save_strategy="steps", save_steps=2)
    resumed.router.fit = None  # resuming must load the saved fit, not refit
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key in ("weight", "bias"):
        torch.testing.assert_close(resumed.router.state_dict()["state"][key], fitted[key])
    torch.testing.assert_close(
        torch.cat([p.flatten() for p in resumed.model.parameters()]),
        torch.cat([p.flatten() for p in trainer.model.parameters()]),
    )


def test_router_fit_rows_fits_on_a_seeded_subset_of_the_pool(tmp_path, trained_teachers, pool_rows):
    """router_fit_rows=N: the router sees N pool rows (of 32), the same N for the same seed, and scores like a router
    fitted by hand on exactly those rows' signals."""
    seen = []

    def fitted(name, **kw):
        trainer = make_trainer(tmp_path / name, trained_teachers, pool_rows, router="relative_mahalanobis",
                               router_fit_rows=20, **kw)
        real = trainer.router.fit
        trainer.router.fit = lambda signals: seen.append(signals) or real(signals)
        trainer.fit_router()
        return trainer

    first, second = fitted("a"), fitted("b")
    assert [s.batch_size for s in seen] == [20, 20]
    torch.testing.assert_close(seen[0].logits[0], seen[1].logits[0])  # same seed, same rows
    other = fitted("c", seed=1)
    assert not torch.equal(seen[2].logits[0], seen[0].logits[0])
    ids = [str(i) for i in pool_rows["id"]]
    chosen = [i for i in ids if any(torch.equal(first.signal_cache.lookup([i], None).logits[0][0], row)
                                    for row in seen[0].logits[0])]
    assert len(chosen) == 20 and first.router.fallback is None
    by_hand = build_router("relative_mahalanobis").fit(first.signal_cache.lookup(chosen, None))
    everything = first.signal_cache.lookup(ids, None)
    torch.testing.assert_close(first.router.score(everything), by_hand.score(everything))
    assert other.router.fitted and second.router.fitted
    with pytest.raises(ValueError, match="router_fit_rows must be >= 2"):
        KnowledgeIntegrationConfig(output_dir=str(tmp_path), report_to=[], router_fit_rows=1)


def test_cached_equals_on_the_fly_for_a_router_without_fit(tmp_path, trained_teachers, pool_rows):
    """Deterministic router (max_prob): the same student whether signals are cached or queried live."""
    fly = make_trainer(tmp_path / "fly", trained_teachers, pool_rows, router="max_prob", mode="on_the_fly")
    fly.train()
    cached = make_trainer(tmp_path / "cached", trained_teachers, pool_rows, router="max_prob", mode="cached")
    cached.train()
    torch.testing.assert_close(
        torch.cat([p.flatten() for p in cached.model.parameters()]),
        torch.cat([p.flatten() for p in fly.model.parameters()]),
        atol=1e-6, rtol=1e-5,
    )


def test_router_scores_drive_selection_in_training_and_evaluation(tmp_path, trained_teachers, pool_rows):
    trainer = make_trainer(tmp_path, trained_teachers, pool_rows)
    trainer.train()
    metrics = trainer.evaluate(pool_rows)
    assert "eval_teacher_selection_accuracy" in metrics
    assert math.isfinite(metrics["eval_loss"])
    assert [trainer.signal_cache.tensors[f"features_{t}"].shape[1] for t in range(2)] == [32, 32]


def test_a_cache_with_features_serves_a_run_that_needs_none(tmp_path, trained_teachers, pool_rows, monkeypatch):
    """MUKI as published (no features) reuses the signals a run that computed features and MC computed."""
    shared = str(tmp_path / "shared")
    make_trainer(tmp_path / "a", trained_teachers, pool_rows, signal_cache_dir=shared).precompute_teacher_signals(mc=True)
    plain = make_trainer(tmp_path / "b", trained_teachers, pool_rows, router="mc_entropy", signal_cache_dir=shared)
    calls = []
    monkeypatch.setattr(plain.querier, "signals", lambda *a, **k: calls.append(1))
    cache = plain.precompute_teacher_signals()
    assert calls == [] and len(cache) == len(pool_rows)


def test_a_richer_mc_cache_is_extended_only_when_that_costs_fewer_passes(tmp_path, trained_teachers, pool_rows,
                                                                      monkeypatch):
    """A run that reads no MC statistics reuses a cache with them when it covers the rows (or when adding the few
    missing ones with K dropout passes costs no more than one plain pass over all rows); for mostly NEW rows it
    writes its own cache of the exact kind with one deterministic pass per row instead."""
    import ki_trainer.querying as querying

    sources = []
    real = querying.query_teachers
    monkeypatch.setattr(querying, "query_teachers",
                        lambda *a, **k: sources.append(k["certainty_source"]) or real(*a, **k))
    shared = str(tmp_path / "shared")
    rich = make_trainer(tmp_path / "a", trained_teachers, pool_rows.select(range(8)), signal_cache_dir=shared)
    rich.precompute_teacher_signals(mc=True, features=True)
    [rich_file] = os.listdir(shared)

    def default(name, rows):
        sources.clear()
        trainer = make_trainer(tmp_path / name, trained_teachers, rows, router=None, signal_cache_dir=shared)
        return trainer.precompute_teacher_signals(), set(sources)

    cache, used = default("b", pool_rows.select(range(8)))  # covered: reused, no teacher pass
    assert used == set() and cache.path.endswith(rich_file)
    cache, used = default("c", pool_rows.select(range(9)))  # 1 missing row x (1 + K=4) passes <= 9 plain passes
    assert used == {"mc"} and cache.path.endswith(rich_file) and len(cache) == 9
    cache, used = default("d", pool_rows)  # 23 missing x 5 > 32: a new cache without MC, every row one pass
    assert used == {None} and not cache.path.endswith(rich_file) and len(cache) == len(pool_rows)
    assert "mc" not in cache.tensors and "features_0" in cache.tensors
    assert sorted(os.listdir(shared)) == sorted([rich_file, os.path.basename(cache.path)])


def test_a_router_that_reads_no_mc_statistics_runs_no_mc_passes(tmp_path, trained_teachers, pool_rows, monkeypatch):
    """The cached default (relative_mahalanobis) reads logits and features: one pass per teacher, no K dropout
    passes; its cache holds no MC tensors. An MC run cannot use that cache and computes its own; a later
    feature router reuses the first one (no teacher query)."""
    import ki_trainer.querying as querying

    sources = []
    real = querying.query_teachers
    monkeypatch.setattr(querying, "query_teachers",
                        lambda *a, **k: sources.append(k["certainty_source"]) or real(*a, **k))
    shared = str(tmp_path / "shared")
    default = make_trainer(tmp_path / "a", trained_teachers, pool_rows, router=None, signal_cache_dir=shared)
    assert default.router.name == "relative_mahalanobis"
    cache = default.precompute_teacher_signals()
    assert sources and set(sources) == {None}
    assert "mc" not in cache.tensors and "mutual_information" not in cache.tensors and "features_0" in cache.tensors
    default.train()  # the student trains from that cache
    with pytest.raises(ValueError, match="holds no 'mc' certainty"):
        cache.lookup([str(pool_rows[0]["id"])], "mc")

    sources.clear()
    published = make_trainer(tmp_path / "b", trained_teachers, pool_rows, router="mc_entropy", signal_cache_dir=shared)
    mc_cache = published.precompute_teacher_signals(features=True)
    assert set(sources) == {"mc"} and "mc" in mc_cache.tensors

    sources.clear()
    again = make_trainer(tmp_path / "c", trained_teachers, pool_rows, router="knn_smoothing", signal_cache_dir=shared)
    again.precompute_teacher_signals()
    assert sources == []  # knn_smoothing reads features: the no-MC cache already has them


def test_a_step_only_scores_the_router_is_fitted_in_the_set_up(tmp_path, trained_teachers, pool_rows):
    """compute_loss never fits: an unfitted transductive router fails the step with a clear error (no precompute
    with collectives mid-step); evaluate() fits it in its set-up, on the training rows, before any step."""
    trainer = make_trainer(tmp_path, trained_teachers, pool_rows, router="relative_mahalanobis")
    batch = trainer._prepare_inputs(trainer.data_collator([pool_rows[i] for i in range(4)]))
    with pytest.raises(RuntimeError, match="transductive: fit it on the unlabeled pool first"):
        trainer.compute_loss(trainer.model, batch)
    assert not trainer.router.fitted and trainer.signal_cache is None
    trainer.evaluate(pool_rows)
    assert trainer.router.fitted and len(trainer.signal_cache) == len(pool_rows)


def test_the_deprecated_flag_name_still_selects_cached_signals():
    """``signal_source`` names where the signals come from; ``teacher_signals``, its earlier name, still works (with a
    FutureWarning naming the new name; see tests/test_deprecations.py)."""
    with pytest.warns(FutureWarning, match="use signal_source='cached'"):
        old = KnowledgeIntegrationConfig(output_dir="unused", report_to=[], teacher_signals="cached")
    assert old.signal_source == "cached" and old.signals_are_cached and old.teacher_signals is None
    assert KnowledgeIntegrationConfig(output_dir="unused", report_to=[], signal_source="cached").signals_are_cached
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="contradicts signal_source='cached'"):
        KnowledgeIntegrationConfig(output_dir="unused", report_to=[], signal_source="cached", teacher_signals="on_the_fly")
