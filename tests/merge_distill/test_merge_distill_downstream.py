"""Downstream accuracy (``fine_tune_accuracy``): masked-LM checkpoints saved with their own tokenizers
(WordPiece English, SentencePiece-style Italian, as in tests/merge_distill/test_merge_distill.py) fine-tuned as
sequence classifiers on a toy task whose label is the sentence's noun."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
from pathlib import Path

import pytest
from test_merge_distill import IT_PIECES, tiny_mlm, unigram_tokenizer, wordpiece_tokenizer

from ki_trainer.merge_distill import fine_tune_accuracy


def noun_task(n: int, seed: int) -> tuple[list[str], list[str]]:
    """English toy sentences labelled by their noun (cat / dog): learnable from one token."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        noun = rng.choice(["cat", "dog"])
        words = ["the", rng.choice(["big", "small"]), noun, rng.choice(["walk", "run"]), "and", "the", rng.choice(["big", "small"])]
        texts.append(" ".join(words))
        labels.append(noun)
    return texts, labels


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two masked LMs, each saved with its own tokenizer; embedding count = tokenizer size."""
    root = tmp_path_factory.mktemp("downstream")
    out = {}
    for name, tokenizer, seed in (("en", wordpiece_tokenizer(), 1), ("it", unigram_tokenizer(IT_PIECES), 2)):
        out[name] = str(root / name)
        tiny_mlm(len(tokenizer), seed=seed).save_pretrained(out[name])
        tokenizer.save_pretrained(out[name])
    return out


SETTING = dict(epochs=8, batch_size=8, learning_rate=3e-3, max_length=16)


def test_accuracy_in_range_learns_and_is_deterministic_per_seed(checkpoints):
    train, test = noun_task(40, seed=0), noun_task(30, seed=1)
    first = fine_tune_accuracy(checkpoints["en"], *train, *test, seed=3, **SETTING)
    again = fine_tune_accuracy(checkpoints["en"], *train, *test, seed=3, **SETTING)
    other = fine_tune_accuracy(checkpoints["en"], *train, *test, seed=4, **SETTING)
    for result in (first, other):
        assert 0.0 <= result["accuracy"] <= 1.0
        assert (result["train_rows"], result["test_rows"], result["labels"], result["steps"]) == (40, 30, 2, 8 * 5)
    # the noun is in the WordPiece vocabulary: a fine-tuned classifier must do far better than chance (0.5)
    assert first["accuracy"] >= 0.9
    timing = ("seconds", "train_seconds")
    assert {k: v for k, v in first.items() if k not in timing} == {k: v for k, v in again.items() if k not in timing}
    assert first["last_epoch_loss"] != other["last_epoch_loss"]  # the seed reaches head init / order / dropout


def test_each_model_uses_its_own_tokenizer(checkpoints):
    train, test = noun_task(16, seed=0), noun_task(8, seed=1)
    setting = dict(SETTING, epochs=1)
    en = fine_tune_accuracy(checkpoints["en"], *train, *test, **setting)
    it = fine_tune_accuracy(checkpoints["it"], *train, *test, **setting)
    assert en["vocab_size"] == len(wordpiece_tokenizer()) and it["vocab_size"] == len(unigram_tokenizer(IT_PIECES))
    # the English WordPiece tokenizer reads every word; the Italian pieces lack 'dog', 'walk', 'big', ...
    assert en["unknown_share"] == 0.0 and it["unknown_share"] > 0.2
    # a tokenizer that is not the model's (more tokens than its embeddings) is refused, not silently clamped
    with pytest.raises(ValueError, match="not this model's tokenizer"):
        fine_tune_accuracy(checkpoints["en"], *train, *test, tokenizer=unigram_tokenizer(IT_PIECES), **setting)


def test_errors_name_the_problem(checkpoints):
    train, test = noun_task(8, seed=0), noun_task(4, seed=1)
    with pytest.raises(ValueError, match="test row 0 has label 'bird'"):
        fine_tune_accuracy(checkpoints["en"], *train, test[0], ["bird"] * 4, **SETTING)
    with pytest.raises(ValueError, match="8 train texts but 7 train labels"):
        fine_tune_accuracy(checkpoints["en"], train[0], train[1][:7], *test, **SETTING)
    with pytest.raises(ValueError, match="exceeds the 64 position embeddings"):
        fine_tune_accuracy(checkpoints["en"], *train, *test, **dict(SETTING, max_length=100))


def _load_benchmark():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "merge_distill.py"
    spec = importlib.util.spec_from_file_location("merge_distill_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_probe_stage_records_each_run_resumes_and_tabulates(checkpoints, tmp_path, monkeypatch):
    """benchmarks/merge_distill.py stage 7 (linear probe on frozen features) on real debian_sections20 rows,
    with the tiny checkpoints standing in for the teachers' encoders and the saved students."""
    md = _load_benchmark()
    teacher_dirs = {"teacher-en": checkpoints["en"], "teacher-it": checkpoints["it"]}
    monkeypatch.setattr(md, "resolve_model", lambda name: teacher_dirs[name])
    for name, source in (("merge_distill--s", "it"), ("plain_mlm--s", "en"), ("init_only--s", "it")):  # differing tokenizers
        shutil.copytree(checkpoints[source], tmp_path / "students" / name.replace("--", ":"))
    cfg = dict(languages={"en": "teacher-en", "it": "teacher-it"}, starts={"s": {}}, trained=[["merge_distill", "s"], ["plain_mlm", "s"]],
               student="merge_distill:s",
               probe=dict(pool_per_class=2, train_per_class=1, test_per_class=1, max_length=16, seeds=[0, 1], l2=1e-3))
    record = md.Record(tmp_path / "results.json")
    md.downstream_all(cfg, tmp_path, record)
    runs = {k: v for k, v in record.data.items() if k.startswith("probe:")}
    assert len(runs) == 2 * 5 * 2  # languages x (2 teachers + 3 students) x probe seeds
    for run in runs.values():
        assert 0.0 <= run["accuracy"] <= 1.0 and run["train_rows"] == 20 and run["labels"] == 20
    # seeds draw different training rows; the test rows are the same for every model
    assert len({run["test_rows"] for run in runs.values()}) <= 2
    assert json.loads((tmp_path / "results.json").read_text()) == record.data  # saved as it goes

    def must_not_run(*args, **kwargs):
        raise AssertionError("a recorded run was probed again")

    monkeypatch.setattr(md, "linear_probe_accuracy", must_not_run)
    monkeypatch.setattr(md, "mean_pooled_features", must_not_run)
    md.downstream_all(cfg, tmp_path, md.Record(tmp_path / "results.json"))  # resumes: nothing left to do
    rows = md.results_rows(cfg, tmp_path, record)
    assert len(rows) == 2 * 5
    teacher_rows = [r for r in rows if r["kind"] == "teacher"]
    assert sorted((r["language"], r["model"], r["assigned"]) for r in teacher_rows) == [
        ("en", "teacher:teacher-en", True), ("en", "teacher:teacher-it", False),
        ("it", "teacher:teacher-en", False), ("it", "teacher:teacher-it", True)]
    row = next(r for r in rows if r["language"] == "en" and r["model"] == "plain_mlm:s")
    values = [runs[f"probe:en:plain_mlm:s:{s}"]["accuracy"] for s in (0, 1)]
    assert row["kind"] == "baseline" and row["n_seeds"] == 2
    assert math.isclose(row["downstream_accuracy"], round(sum(values) / 2, 4))
    assert math.isclose(row["downstream_std"], round(abs(values[0] - values[1]) / math.sqrt(2), 4))
    goal = md.goal(cfg, rows)
    assert set(goal["gap_to_own_teacher"]) == {"en", "it"} and goal["best_single_teacher"] in teacher_dirs


def test_benchmark_teacher_head_training_unfreezes_the_asked_layers_and_keeps_the_decoder_tied():
    """benchmarks/merge_distill.py stage 3: ``teacher_train_layers`` top layers and the head train (the layers at
    ``teacher_layer_lr``), the rest and the tied input embeddings stay; per-teacher settings override the config."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    md = _load_benchmark()
    tokenizer = wordpiece_tokenizer()
    texts = noun_task(60, seed=0)[0]

    def trained(layers: int) -> tuple[BertForMaskedLM, BertForMaskedLM, dict]:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        model = BertForMaskedLM(config)
        before = BertForMaskedLM(config)
        before.load_state_dict(model.state_dict())
        cfg = dict(teacher_batch=8, max_length=16, teacher_train_layers=layers, teacher_lr=1e-2, teacher_layer_lr=1e-3,
                   teacher_epochs=3)
        columns = md.teacher_columns(tokenizer, texts, 16)
        return model, before, md.train_teacher_head(model, tokenizer, texts, cfg, columns)

    for layers in (1, 2):
        model, before, stats = trained(layers)
        assert stats["trained_layers"] == layers and len(stats["held_out_loss_top1_by_epoch"]) >= 2
        head = model.cls.predictions
        assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight and head.decoder.bias is head.bias
        assert torch.equal(model.bert.embeddings.word_embeddings.weight, before.bert.embeddings.word_embeddings.weight)
        changed = [not torch.equal(a.attention.self.query.weight, b.attention.self.query.weight)
                   for a, b in zip(model.bert.encoder.layer, before.bert.encoder.layer)]
        assert stats["kept_epoch"] > 0  # a trained state was kept (held-out loss fell on this learnable toy text)
        assert changed == [layers == 2, True]
        assert not torch.equal(head.transform.dense.weight, before.cls.predictions.transform.dense.weight)
        # held-out loss is finite and the kept epoch is the best one
        losses = [loss for loss, _ in stats["held_out_loss_top1_by_epoch"]]
        assert all(math.isfinite(x) for x in losses) and losses[stats["kept_epoch"]] == min(losses)
    cfg = {"languages": {"en": "a", "it": "b"}, "teacher_rows": 10, "teacher_overrides": {"a": {"teacher_rows": 30}}}
    assert (md.teacher_rows(cfg, "en"), md.teacher_rows(cfg, "it")) == (30, 10)
    assert md.teacher_cfg(cfg, "b")["teacher_rows"] == 10


def test_benchmark_distillation_effect_pairs_each_training_seed():
    """KD minus plain MLM per training seed and language, from the result rows; a seed without both rows is left out."""
    md = _load_benchmark()
    cfg = {"languages": {"en": "a", "it": "b"}, "seed": 0, "student_seeds": [1, 2],
           "trained": [["merge_distill", "s"], ["plain_mlm", "s"]], "extra_trained": [["merge_distill", "t"]]}
    assert md.seeded("merge_distill:s", 0, cfg) == "merge_distill:s" and md.seeded("plain_mlm:s", 2, cfg) == "plain_mlm:s@seed2"
    acc = {("en", "merge_distill:s"): 0.60, ("it", "merge_distill:s"): 0.50, ("en", "plain_mlm:s"): 0.55, ("it", "plain_mlm:s"): 0.52,
           ("en", "merge_distill:s@seed1"): 0.62, ("it", "merge_distill:s@seed1"): 0.54,
           ("en", "plain_mlm:s@seed1"): 0.60, ("it", "plain_mlm:s@seed1"): 0.50,
           ("en", "merge_distill:s@seed2"): 0.9,  # no plain row for seed 2: not a pair
           ("en", "init_only:s"): 0.58, ("it", "init_only:s"): 0.49, ("en", "merge_distill:t"): 0.4, ("it", "merge_distill:t"): 0.4}
    rows = [{"language": lang, "model": model, "downstream_accuracy": a} for (lang, model), a in acc.items()]
    effect = md.distillation_effect(cfg, rows)
    assert set(effect) == {"s"}  # t has no plain-MLM twin
    e = effect["s"]
    assert e["training_seeds"] == [0, 1]
    assert e["kd_minus_plain"] == {0: {"en": 0.05, "it": -0.02}, 1: {"en": 0.02, "it": 0.04}}
    assert e["kd_minus_plain_mean"] == {"en": 0.035, "it": 0.01}
    assert e["merge_distill"]["en"] == 0.61 and e["plain_mlm"]["it"] == 0.51 and e["init_only"] == {"en": 0.58, "it": 0.49}
    assert math.isclose(e["merge_distill"]["mean"], round((0.61 + 0.52) / 2, 4))
    assert math.isclose(e["merge_distill"]["std_over_training_seeds"]["en"], round(0.02 / math.sqrt(2), 4))
