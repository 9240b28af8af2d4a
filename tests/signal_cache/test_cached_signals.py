"""Cached teacher signals: same result as on the fly, order-independent, reused, never stale."""

import os

import pytest
import torch
from conftest import build_tokenizer, make_rows, tiny_bert
from conftest import flat_weights as weights
from datasets import Dataset

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher
from ki_trainer.signal_cache import StaleSignalCacheError, TeacherSignalCache


@pytest.fixture
def data():
    rows = make_rows(6, seed=4)
    return Dataset.from_list([{"id": f"ex{i}", "text": r["text"]} for i, r in enumerate(rows)])


def trainer_for(tmp_path, trained_teachers, dataset, mode, strategy="entropy", cache_dir=None, mc_samples=4, **kw):
    tok = build_tokenizer()
    teachers = [Teacher(model, tokenizer=own, name=f"t{i}") for i, (model, own) in enumerate(trained_teachers)]
    args = KnowledgeIntegrationConfig(
        output_dir=str(tmp_path / mode),
        strategy=strategy,
        signal_source=mode,
        signal_cache_dir=str(cache_dir or tmp_path / "cache"),
        max_steps=3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=5,
        learning_rate=1e-3,
        mc_samples=mc_samples,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        **kw,
    )
    return KnowledgeIntegrationTrainer(
        model=tiny_bert(4, len(tok), seed=3), args=args, teachers=teachers, train_dataset=dataset, processing_class=tok
    )


def test_cached_training_equals_on_the_fly_for_deterministic_signals(tmp_path, trained_teachers, data):
    fly = trainer_for(tmp_path, trained_teachers, data, "on_the_fly")
    fly.train()
    cached = trainer_for(tmp_path, trained_teachers, data, "cached")
    cached.train()
    assert len(cached.signal_cache) == len(data)
    torch.testing.assert_close(weights(cached.model), weights(fly.model), atol=1e-6, rtol=1e-5)


def test_lookup_is_by_id_whatever_the_order(tmp_path, trained_teachers, data):
    trainer = trainer_for(tmp_path, trained_teachers, data.shuffle(seed=1), "cached")
    cache = trainer.precompute_teacher_signals(mc=True)  # also the MC statistics the entropy strategy does not read
    rows = [data[i] for i in (5, 0, 17)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    teacher_batches = batch.pop("teacher_inputs", {})
    ids = batch.pop("example_ids")
    assert ids == ["ex5", "ex0", "ex17"]
    fresh = trainer.query_signals({k: v for k, v in batch.items()}, teacher_batches)
    looked_up = cache.lookup(ids, "deterministic")
    for a, b in zip(looked_up.logits, fresh.logits):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(looked_up.certainty, fresh.certainty)
    assert cache.lookup(ids, "mc").certainty.shape == (3, 2)


def test_cache_file_is_reused_and_extended(tmp_path, trained_teachers, data):
    first = trainer_for(tmp_path, trained_teachers, data.select(range(10)), "cached")
    first.precompute_teacher_signals()
    path = first.signal_cache.path
    old_ids = [f"ex{i}" for i in range(10)]
    before = first.signal_cache.lookup(old_ids, "deterministic")
    assert os.path.exists(path)
    second = trainer_for(tmp_path, trained_teachers, data, "cached")
    calls = []
    original = second.cached_signals.batches
    second.cached_signals.batches = lambda ds, todo, **kw: (calls.append(len(todo)), original(ds, todo, **kw))[1]
    cache = second.precompute_teacher_signals()
    assert calls == [len(data) - 10]  # only the new ids were computed
    assert len(cache) == len(data) and second.signal_cache.path == path
    after = cache.lookup(old_ids, "deterministic")  # the reused rows still hold their own signals
    for a, b in zip(after.logits, before.logits):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(after.certainty, before.certainty)
    assert cache.lookup([f"ex{len(data) - 1}"], "deterministic").certainty.shape == (1, 2)


def test_other_teachers_never_use_the_cache(tmp_path, trained_teachers, data):
    first = trainer_for(tmp_path, trained_teachers, data, "cached")
    first.precompute_teacher_signals()
    before = first.signal_fingerprint()
    other = trainer_for(tmp_path, trained_teachers, data, "cached", mc_samples=8)  # other MC settings
    assert other.signal_fingerprint(mc=True) != first.signal_fingerprint(mc=True)
    assert other.signal_fingerprint() == before  # the entropy strategy reads no MC: its cache does not depend on K
    with torch.no_grad():
        trained_teachers[0][0].classifier.bias.add_(0.5)
    try:
        third = trainer_for(tmp_path, trained_teachers, data, "cached")
        assert third.signal_fingerprint() != before  # other teacher weights
    finally:
        with torch.no_grad():
            trained_teachers[0][0].classifier.bias.sub_(0.5)


def test_changed_text_under_the_same_id_is_a_stale_cache(tmp_path, trained_teachers, data):
    trainer_for(tmp_path, trained_teachers, data, "cached").precompute_teacher_signals()
    edited = data.map(lambda row: {"text": row["text"] + " extra" if row["id"] == "ex3" else row["text"]})
    with pytest.raises(StaleSignalCacheError, match="'ex3' is cached with a different text"):
        trainer_for(tmp_path, trained_teachers, edited, "cached").precompute_teacher_signals()


def test_a_cache_file_with_another_fingerprint_is_refused(tmp_path, trained_teachers, data):
    trainer = trainer_for(tmp_path, trained_teachers, data, "cached")
    cache = trainer.precompute_teacher_signals()
    with pytest.raises(StaleSignalCacheError, match="computed for other teachers or settings"):
        TeacherSignalCache.load(cache.path, "somethingelse", cache.label_sizes)


def test_ids_are_required_and_unique(tmp_path, trained_teachers, data):
    with pytest.raises(ValueError, match="need an example id column 'id'"):
        trainer_for(tmp_path, trained_teachers, data.remove_columns("id"), "cached").precompute_teacher_signals()
    duplicated = data.map(lambda row: {"id": "same"})
    with pytest.raises(ValueError, match="duplicate ids"):
        trainer_for(tmp_path, trained_teachers, duplicated, "cached").precompute_teacher_signals()


def test_unknown_id_at_lookup_is_an_error(tmp_path, trained_teachers, data):
    cache = trainer_for(tmp_path, trained_teachers, data, "cached").precompute_teacher_signals()
    with pytest.raises(StaleSignalCacheError, match="'nope' has no cached teacher signals"):
        cache.lookup(["nope"], "mc")


def test_cached_mode_works_without_datasets_and_with_a_custom_collator(tmp_path, trained_teachers, data):
    """A plain list of dict rows (no `datasets`, as on a bare GPU image) and no processing_class."""
    trainer = trainer_for(tmp_path, trained_teachers, data, "cached")
    rows = [data[i] for i in range(len(data))]
    custom = KnowledgeIntegrationTrainer(
        model=tiny_bert(4, 60, seed=3), args=trainer.args, teachers=trainer.teachers, train_dataset=rows,
        data_collator=trainer.data_collator,
    )
    cache = custom.precompute_teacher_signals()
    assert len(cache) == len(data)


@pytest.fixture
def eval_rows():
    """Labeled evaluation rows whose ids REUSE the training ids ("ex0", ...) with other texts."""
    rows = make_rows(3, seed=9)
    return Dataset.from_list([{"id": f"ex{i}", "text": r["text"], "label": r["label"]} for i, r in enumerate(rows)])


def count_teacher_forwards(trainer):
    calls = []
    for teacher in trainer.teachers:
        teacher.model.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_cached_evaluation_equals_live_evaluation_for_deterministic_signals(tmp_path, trained_teachers, data, eval_rows):
    live = trainer_for(tmp_path, trained_teachers, data, "on_the_fly").evaluate(eval_rows)
    cached = trainer_for(tmp_path, trained_teachers, data, "cached").evaluate(eval_rows)
    for key in ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_teacher_selection_accuracy"):
        assert cached[key] == pytest.approx(live[key], rel=1e-5, abs=1e-6), key


def test_cached_evaluation_queries_teachers_once_and_keeps_its_own_file(tmp_path, trained_teachers, data, eval_rows):
    trainer = trainer_for(tmp_path, trained_teachers, data, "cached", strategy="muki")
    trainer.train()  # the training rows' cache: ids ex0.. with OTHER texts than the eval rows
    calls = count_teacher_forwards(trainer)
    first = trainer.evaluate(eval_rows, metric_key_prefix="test")
    assert len(calls) > 0  # MC signals of the eval rows computed once...
    calls.clear()
    second = trainer.evaluate(eval_rows, metric_key_prefix="test")
    assert calls == []  # ...and reused: no teacher forward at all
    assert second == pytest.approx({**first, **{k: second[k] for k in second if "runtime" in k or "per_second" in k}})
    fingerprint = trainer.signal_fingerprint()
    digest = trainer.cached_signals.dataset_digest(eval_rows)  # eval caches are scoped by prefix and dataset content
    assert sorted(os.listdir(tmp_path / "cache")) == sorted([f"{fingerprint}.safetensors", f"{fingerprint}.test.{digest}.safetensors"])
    assert trainer._eval_signal_cache is None  # training never reads the evaluation cache


def test_evaluation_rows_without_ids_are_queried_live(tmp_path, trained_teachers, data, eval_rows):
    trainer = trainer_for(tmp_path, trained_teachers, data, "cached")
    calls = count_teacher_forwards(trainer)
    metrics = trainer.evaluate(eval_rows.remove_columns("id"))
    assert len(calls) > 0 and "eval_accuracy" in metrics
    assert not os.path.exists(tmp_path / "cache")


def test_each_named_eval_dataset_gets_its_own_cache(tmp_path, trained_teachers, data, eval_rows):
    trainer = trainer_for(tmp_path, trained_teachers, data, "cached")
    trainer.eval_dataset = {"en": eval_rows, "other": eval_rows.map(lambda row: {"text": row["text"] + " extra"})}
    metrics = trainer.evaluate()  # Trainer calls evaluate("en") and evaluate("other"): same ids, other texts
    assert "eval_en_accuracy" in metrics and "eval_other_accuracy" in metrics
    fingerprint = trainer.signal_fingerprint()
    en, other = (trainer.cached_signals.dataset_digest(trainer.eval_dataset[k]) for k in ("en", "other"))
    assert {f"{fingerprint}.eval_en.{en}.safetensors", f"{fingerprint}.eval_other.{other}.safetensors"} <= set(os.listdir(tmp_path / "cache"))


def test_standardized_certainty_needs_cached_signals():
    with pytest.raises(ValueError, match="set signal_source='cached'"):
        KnowledgeIntegrationConfig(output_dir="x", certainty_normalization="standardize", report_to=[])
    with pytest.raises(ValueError, match="'none' or 'standardize'"):
        KnowledgeIntegrationConfig(output_dir="x", certainty_normalization="zscore", report_to=[])


def test_standardized_certainty_compares_each_teacher_with_itself(tmp_path, trained_teachers, data, eval_rows):
    trainer = trainer_for(tmp_path, trained_teachers, data, "cached", strategy="muki", router="mc_entropy",
                          certainty_normalization="standardize")
    cache = trainer.precompute_teacher_signals()
    raw = cache.lookup(list(data["id"]), "mc")
    z = trainer.normalize_certainty(raw).certainty
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    # a teacher that is raw-less-certain but unusually certain FOR ITSELF wins after standardizing
    trainer.certainty_statistics = (torch.tensor([0.5, 0.1]), torch.tensor([0.1, 0.01]))
    picked = trainer.normalize_certainty(type(raw)(logits=raw.logits[:1], certainty=torch.tensor([[0.55, 0.12]])))
    torch.testing.assert_close(picked.certainty, torch.tensor([[0.5, 2.0]]))
    assert picked.certainty.argmax(1).item() == 1  # raw certainty would pick teacher 0


def test_standardized_training_and_evaluation_run(tmp_path, trained_teachers, data, eval_rows):
    trainer = trainer_for(tmp_path, trained_teachers, data, "cached", strategy="muki", selection="hard",
                          certainty_normalization="standardize")
    metrics = trainer.evaluate(eval_rows)  # before train(): the statistics are fitted on the training rows first
    assert trainer.certainty_statistics is not None and 0.0 <= metrics["eval_teacher_selection_accuracy"] <= 1.0
    trainer.train()
    assert torch.isfinite(weights(trainer.model)).all()


def test_cached_evaluation_works_without_datasets(tmp_path, trained_teachers, data, eval_rows):
    """Plain lists of dict rows are cached for evaluation as they are for training."""
    trainer = trainer_for(tmp_path, trained_teachers, data, "cached")
    rows = [eval_rows[i] for i in range(len(eval_rows))]
    assert "eval_accuracy" in trainer.evaluate(rows)
    assert f"{trainer.signal_fingerprint()}.eval.{trainer.cached_signals.dataset_digest(rows)}.safetensors" in os.listdir(tmp_path / "cache")


def test_a_strategy_replaced_after_construction_decides_which_signals_are_cached(tmp_path, trained_teachers, data):
    """What the cache must hold is derived when the precompute runs, not copied when the trainer is built: a trainer
    built for vanilla_kd (no certainty) whose strategy is then replaced by muki computes the MC statistics."""
    from ki_trainer import get_strategy

    trainer = trainer_for(tmp_path, trained_teachers, data, "cached", strategy="vanilla_kd")
    assert trainer.needs.certainty_source is None and trainer.router is None
    trainer.strategy = get_strategy("muki")(trainer.label_space, trainer.args.strategy_options())
    assert trainer.needs.certainty_source == "mc"
    cache = trainer.precompute_teacher_signals()
    assert "mc" in cache.tensors
    ids = [data[i]["id"] for i in range(3)]
    assert cache.lookup(ids, "mc").certainty.shape == (3, 2)
    trainer.train()  # the muki loss reads the cached MC certainty
