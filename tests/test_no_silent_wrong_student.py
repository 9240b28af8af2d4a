"""Reliability (issue 11): no silent wrong student, no lost work, caches and checkpoints that cannot lie.

Each test pins one row of docs/reliability.md. New names are imported inside the tests that need them,
so every test here can be run against older code and fails there for its own reason.
"""

import copy
import json
import logging
import os

import pytest
import torch
from conftest import TEACHER_SPLIT, build_tokenizer, make_rows, teacher_words, tiny_bert
from conftest import flat_weights as weights
from conftest import ki_config as config
from conftest import make_ki_trainer as make_trainer
from conftest import rows_with_ids
from datasets import Dataset
from transformers import HfArgumentParser, TrainerCallback

from ki_trainer import KnowledgeIntegrationConfig, Teacher
from ki_trainer import signal_cache
from ki_trainer.label_space import LabelSpace
from ki_trainer.signal_cache import TeacherSignalCache, teachers_fingerprint
from ki_trainer.strategies import TeacherSignals


def fresh_teachers(tok, seeds=(20, 21)):
    return [
        Teacher(tiny_bert(2, len(tok), labels=labels, seed=seed), name=f"t{i}")
        for i, (labels, seed) in enumerate(zip(TEACHER_SPLIT, seeds))
    ]




# ---------------------------------------------------------------- 1. silent NaN student
@pytest.mark.parametrize("field", ["kd_temperature", "teacher_score_temperature", "learning_rate", "weight_decay"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_settings_are_rejected(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        KnowledgeIntegrationConfig(output_dir=str(tmp_path), report_to=[], **{field: value})


def test_non_finite_settings_are_rejected_from_the_command_line(tmp_path):
    parser = HfArgumentParser(KnowledgeIntegrationConfig)
    for flag in ("--kd_temperature", "--teacher_score_temperature"):
        with pytest.raises(ValueError, match="must be a finite number"):
            parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none", flag, "nan"])


def nan_teacher(tok, seed=20, labels=TEACHER_SPLIT[0], name="t0"):
    model = tiny_bert(2, len(tok), labels=labels, seed=seed)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    return Teacher(model, name=name)


@pytest.mark.parametrize("logging_steps", [1, 100])
def test_a_non_finite_loss_stops_training_instead_of_logging_zero(tmp_path, tok, logging_steps):
    teachers = [nan_teacher(tok), fresh_teachers(tok)[1]]
    train = Dataset.from_list([{"text": r["text"]} for r in make_rows(4, seed=1)])
    trainer = make_trainer(tmp_path, tok, teachers, train, max_steps=2, logging_steps=logging_steps,
                           check_teacher_outputs=False)
    logged = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    trainer.add_callback(Recorder())
    with pytest.raises(FloatingPointError, match="loss was NaN/inf in .* training step"):
        trainer.train()
    assert not any(logs.get("loss") == 0.0 for logs in logged)  # never a NaN reported as 0.0
    with pytest.raises(FloatingPointError, match="loss was NaN/inf"):
        trainer.save_model(str(tmp_path / "nan-student"))  # and never saved
    assert not os.path.exists(tmp_path / "nan-student" / "model.safetensors")


def test_a_non_finite_loss_is_checked_before_a_checkpoint_is_written(tmp_path, tok):
    teachers = [nan_teacher(tok), fresh_teachers(tok)[1]]
    train = Dataset.from_list([{"text": r["text"]} for r in make_rows(4, seed=1)])
    trainer = make_trainer(tmp_path, tok, teachers, train, max_steps=2, logging_steps=100, save_strategy="steps",
                           save_steps=1, check_teacher_outputs=False)
    with pytest.raises(FloatingPointError, match="before saving a checkpoint"):
        trainer.train()
    assert not os.path.exists(tmp_path / "out" / "checkpoint-1")


# ---------------------------------------------------------------- 2. NaN teacher outputs name the rows
def apple_poisoned_teacher(tok):
    """A teacher whose outputs are NaN exactly on texts containing 'apple'."""
    model = tiny_bert(2, len(tok), labels=TEACHER_SPLIT[0], seed=20)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[tok.convert_tokens_to_ids("apple")] = float("nan")
    return Teacher(model, name="poisoned")


def test_nan_teacher_error_names_the_example_ids_in_cached_mode(tmp_path, tok):
    rows = rows_with_ids()
    apple_ids = [r["id"] for r in rows if "apple" in r["text"].split()]
    assert 0 < len(apple_ids) < len(rows)
    teachers = [apple_poisoned_teacher(tok), fresh_teachers(tok)[1]]
    trainer = make_trainer(tmp_path, tok, teachers, rows, max_steps=1, signal_source="cached",
                           per_device_eval_batch_size=len(rows))
    with pytest.raises(FloatingPointError) as info:
        trainer.precompute_teacher_signals()
    message = str(info.value)
    assert "'poisoned'" in message and "example ids" in message
    named = [r["id"] for r in rows if repr(r["id"]) in message]
    assert sorted(named) == sorted(apple_ids[:10])


def test_nan_teacher_error_names_batch_rows_on_the_fly(tmp_path, tok):
    rows = [{"text": "apple basil the of"}, {"text": "grape dill the of"}, {"text": "apple bean and"}]
    teachers = [apple_poisoned_teacher(tok), fresh_teachers(tok)[1]]
    trainer = make_trainer(tmp_path, tok, teachers, rows, max_steps=1, per_device_train_batch_size=3)
    batch = trainer.data_collator(rows)
    with pytest.raises(FloatingPointError, match=r"'poisoned' on rows \[0, 2\] of the batch"):
        trainer.compute_loss(trainer.model, batch)


# ---------------------------------------------------------------- 3. duplicate teachers
def test_the_same_teacher_twice_is_rejected(tmp_path, tok):
    model = tiny_bert(2, len(tok), labels=TEACHER_SPLIT[0], seed=20)
    train = [{"text": "apple"}]
    student = tiny_bert(2, len(tok), seed=3)
    with pytest.raises(ValueError, match="same model object"):
        make_trainer(tmp_path, tok, [Teacher(model), Teacher(model, name="again")], train, student=student)
    twin = Teacher(model, name="twin")
    with pytest.raises(ValueError, match="same model object"):
        make_trainer(tmp_path, tok, [twin, twin], train, student=student)


def test_equal_weights_in_two_wrappers_are_rejected(tmp_path, tok):
    model = tiny_bert(2, len(tok), labels=TEACHER_SPLIT[0], seed=20)
    with pytest.raises(ValueError, match="identical weights"):
        make_trainer(tmp_path, tok, [Teacher(model, name="a"), Teacher(copy.deepcopy(model), name="b")],
                     [{"text": "apple"}], student=tiny_bert(2, len(tok), seed=3))


def test_a_collapsed_mean_margin_is_warned_about(tmp_path, tok, caplog):
    teachers = []
    for i, (labels, seed) in enumerate(zip(TEACHER_SPLIT, (20, 21))):
        model = tiny_bert(2, len(tok), labels=labels, seed=seed)
        with torch.no_grad():  # a head that always answers uniformly: certainty 0 for both, margin 1e-6
            model.classifier.weight.zero_()
            model.classifier.bias.zero_()
        teachers.append(Teacher(model, name=f"u{i}"))
    train = [{"text": r["text"]} for r in make_rows(4, seed=1)]
    trainer = make_trainer(tmp_path, tok, teachers, train, max_steps=2, logging_steps=1)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert any("mean margin" in r.getMessage() and "barely learns" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- 4. the cache fingerprint sees the config
def test_signal_fingerprint_covers_the_teacher_config(tok):
    low = Teacher(tiny_bert(2, len(tok), labels=TEACHER_SPLIT[0], seed=20, dropout=0.1))
    high = Teacher(tiny_bert(2, len(tok), labels=TEACHER_SPLIT[0], seed=20, dropout=0.5))
    assert torch.equal(weights(low.model), weights(high.model))  # same weights, other MC draws
    a = teachers_fingerprint([low], tok, [None], 4, torch.float32)
    b = teachers_fingerprint([high], tok, [None], 4, torch.float32)
    assert a != b
    gelu = Teacher(tiny_bert(2, len(tok), labels=TEACHER_SPLIT[0], seed=20, dropout=0.1, hidden_act="relu"))
    assert teachers_fingerprint([gelu], tok, [None], 4, torch.float32) != a


# ---------------------------------------------------------------- 5. checkpoints record their run
def _train_with_checkpoints(tmp_path, tok, teachers, out, max_steps=4, **kw):
    train = Dataset.from_list([{"text": r["text"]} for r in make_rows(8, seed=7)])
    trainer = make_trainer(tmp_path, tok, teachers, train, max_steps=max_steps, save_strategy="steps", save_steps=2,
                           learning_rate=1e-3, output_dir=str(out), **kw)
    return trainer


def test_resume_refuses_a_checkpoint_of_other_teachers(tmp_path, tok):
    out = tmp_path / "shared"
    _train_with_checkpoints(tmp_path, tok, fresh_teachers(tok), out).train()
    other = _train_with_checkpoints(tmp_path, tok, fresh_teachers(tok, seeds=(30, 31)), out)
    with pytest.raises(ValueError, match="belongs to another run.*teachers"):
        other.train(resume_from_checkpoint=True)
    strategy = _train_with_checkpoints(tmp_path, tok, fresh_teachers(tok), out, strategy="vanilla_kd")
    with pytest.raises(ValueError, match="belongs to another run.*strategy"):
        strategy.train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_resume_refuses_a_longer_runs_checkpoint_instead_of_training_zero_steps(tmp_path, tok):
    out = tmp_path / "shared"
    _train_with_checkpoints(tmp_path, tok, fresh_teachers(tok), out, max_steps=4).train()
    shorter = _train_with_checkpoints(tmp_path, tok, fresh_teachers(tok), out, max_steps=2)
    with pytest.raises(ValueError, match="nothing would be trained"):
        shorter.train(resume_from_checkpoint=True)


def test_a_checkpoint_cut_off_mid_write_falls_back_to_the_previous_one(tmp_path, tok, caplog):
    full = _train_with_checkpoints(tmp_path, tok, fresh_teachers(tok), tmp_path / "full")
    full.train()
    out = tmp_path / "killed"
    _train_with_checkpoints(tmp_path, tok, fresh_teachers(tok), out).train()
    os.remove(out / "checkpoint-4" / "trainer_state.json")  # killed while writing checkpoint-4
    resumed = _train_with_checkpoints(tmp_path, tok, fresh_teachers(tok), out)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=True)
    assert any("checkpoint-4" in r.getMessage() and "cut off" in r.getMessage() for r in caplog.records)
    assert resumed.state.global_step == 4
    torch.testing.assert_close(weights(resumed.model), weights(full.model))


# ---------------------------------------------------------------- 6. teacher instances and vocabularies
def test_a_teacher_instance_with_an_unknown_tokenizer_is_warned_about(tmp_path, tok, caplog):
    teachers = fresh_teachers(tok)  # built in-process: nothing says which vocabulary they were trained on
    with caplog.at_level(logging.WARNING):
        make_trainer(tmp_path, tok, teachers, [{"text": "apple"}])
    assert any("own tokenizer is unknown" in r.getMessage() and "'t0'" in r.getMessage() for r in caplog.records)


def test_a_teacher_instance_loaded_from_a_directory_is_checked_against_its_saved_vocabulary(tmp_path, tok):
    from transformers import AutoModelForSequenceClassification

    own = build_tokenizer(teacher_words(["alpha", "beta"]))
    tiny_bert(2, len(tok), labels=["alpha", "beta"], seed=20).save_pretrained(tmp_path / "t0")
    own.save_pretrained(tmp_path / "t0")
    instance = AutoModelForSequenceClassification.from_pretrained(tmp_path / "t0")  # an INSTANCE, not a path
    other = Teacher(tiny_bert(2, len(tok), labels=["gamma", "delta"], seed=21), name="ok")
    with pytest.raises(ValueError, match="saved with its own tokenizer"):
        make_trainer(tmp_path, tok, [Teacher(instance), other], [{"text": "apple"}])


# ---------------------------------------------------------------- 7. no lost work
def test_an_interrupted_precompute_keeps_the_rows_it_computed(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(signal_cache.store, "FLUSH_ROWS", 4)
    rows = rows_with_ids()
    first = make_trainer(tmp_path, tok, fresh_teachers(tok), rows, signal_source="cached",
                         per_device_eval_batch_size=4)
    original = first.cached_signals.batches

    def dies_after_three_batches(dataset, positions, **kw):
        for n, item in enumerate(original(dataset, positions, **kw)):
            if n == 3:
                raise KeyboardInterrupt("killed")
            yield item

    first.cached_signals.batches = dies_after_three_batches
    with pytest.raises(KeyboardInterrupt):
        first.precompute_teacher_signals()
    second = make_trainer(tmp_path, tok, fresh_teachers(tok), rows, signal_source="cached",
                          per_device_eval_batch_size=4)
    computed = []
    original2 = second.cached_signals.batches
    second.cached_signals.batches = lambda ds, todo, **kw: (computed.append(len(todo)), original2(ds, todo, **kw))[1]
    cache = second.precompute_teacher_signals()
    assert computed == [len(rows) - 12]  # the 12 rows of the 3 finished batches were kept
    assert len(cache) == len(rows)
    assert sorted(os.listdir(tmp_path / "out" / "teacher_signals")) == [f"{second.signal_fingerprint()}.safetensors"]


@pytest.mark.parametrize("bad, problem", [(7, "not a string"), ("bad \ud800 text", "lone surrogate")])
def test_bad_rows_are_found_by_a_scan_before_any_work(tmp_path, tok, bad, problem):
    rows = rows_with_ids()
    rows[5]["text"] = bad
    for mode in ("cached", "on_the_fly"):
        with pytest.raises(ValueError, match=rf"row 5 \(id 'ex5'\).*{problem}"):
            make_trainer(tmp_path, tok, fresh_teachers(tok), rows, signal_source=mode)


def test_an_unwritable_directory_fails_at_construction(tmp_path, tok):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rows = rows_with_ids()
    with pytest.raises(PermissionError, match="signal_cache_dir=.*cannot be written"):
        make_trainer(tmp_path, tok, fresh_teachers(tok), rows, signal_source="cached",
                     signal_cache_dir=str(blocker / "cache"))
    with pytest.raises(PermissionError, match="signal_cache_dir=.*cannot be written"):
        make_trainer(tmp_path, tok, fresh_teachers(tok), rows, signal_source="cached",
                     signal_cache_dir="/proc/ki-trainer-cache")
    with pytest.raises(PermissionError, match="output_dir=.*cannot be written"):
        make_trainer(tmp_path, tok, fresh_teachers(tok), rows, output_dir=str(blocker / "out"))


def _cache_with(path, ids, fill):
    n = len(ids)
    cache = TeacherSignalCache("fp", [2, 2], str(path))
    signals = TeacherSignals(logits=[torch.full((n, 2), fill), torch.full((n, 2), fill)], certainty=torch.rand(n, 2))
    cache.add(ids, [f"text of {i}" for i in ids], signals, torch.rand(n, 2))
    return cache.finalize(torch.device("cpu"))


def test_the_cache_holds_any_named_per_row_tensors(tmp_path):
    path = tmp_path / "fp.safetensors"
    cache = TeacherSignalCache("fp", [2, 2], str(path))
    extra = {"logits": torch.rand(3, 4), "mc": torch.rand(3, 2), "pooled_fp16": torch.rand(3, 2, 5).half()}
    cache.add_rows(["a", "b", "c"], [1, 2, 3], extra)
    cache.finalize(torch.device("cpu")).save()
    loaded = TeacherSignalCache.load(str(path), "fp", [2, 2])
    assert loaded.tensors["pooled_fp16"].dtype == torch.float16
    torch.testing.assert_close(loaded.tensors["pooled_fp16"], extra["pooled_fp16"])


def test_two_writers_sharing_a_cache_merge_instead_of_overwriting(tmp_path):
    path = tmp_path / "c" / "fp.safetensors"
    a = _cache_with(path, ["a0", "a1"], 1.0)  # both started from an empty cache ...
    b = _cache_with(path, ["b0", "b1", "b2"], 2.0)
    a.save()
    b.save()  # ... and the last writer does not win
    merged = TeacherSignalCache.load(str(path), "fp", [2, 2])
    assert sorted(merged.index) == ["a0", "a1", "b0", "b1", "b2"]
    assert merged.lookup(["a1", "b2"], None).logits[0][:, 0].tolist() == [1.0, 2.0]


def test_shards_of_several_writers_are_merged_on_load(tmp_path):
    path = tmp_path / "fp.safetensors"
    for ids in (["r0", "r1"], ["r2"]):
        assert _cache_with(path, ids, 0.5).flush() is not None  # e.g. one writer per rank, never compacted
    assert not path.exists()
    merged = TeacherSignalCache.load(str(path), "fp", [2, 2])
    assert sorted(merged.index) == ["r0", "r1", "r2"]


# ---------------------------------------------------------------- 8. corrupt cache files
def _saved_cache(tmp_path):
    path = tmp_path / "fp.safetensors"
    _cache_with(path, ["a", "b", "c"], 1.0).save()
    return path


def _rewrite(path, change):
    """Change the header (safetensors layout: 8 bytes of length, JSON) or the data of a cache file."""
    raw = bytearray(path.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    change(header, raw, 8 + length)
    text = json.dumps(header).encode()
    assert len(text) <= length
    path.write_bytes(bytes(raw[:8] + text + b" " * (length - len(text)) + raw[8 + length :]))


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _short_tensors(header, raw, start):
    header["mc"]["shape"][0] -= 1  # the header claims fewer rows than ids


def _bit_rot(header, raw, start):
    raw[start + header["logits"]["data_offsets"][0] + 9] ^= 0x04  # one bit of one logit


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"garbage" * 50),
        _cut,
        lambda p: p.write_bytes(b""),
        lambda p: _rewrite(p, _short_tensors),
        lambda p: _rewrite(p, _bit_rot),
    ],
    ids=["garbage", "cut-in-half", "empty", "tensors-shorter-than-ids", "tampered"],
)
def test_a_corrupt_cache_file_is_one_clear_error(tmp_path, damage):
    path = _saved_cache(tmp_path)
    damage(path)
    with pytest.raises(RuntimeError) as info:
        TeacherSignalCache.load(str(path), "fp", [2, 2])
    message = str(info.value)
    assert str(path) in message and "corrupt" in message and "delete it" in message
    assert "weights_only" not in message


# ---------------------------------------------------------------- 9. training gold labels are ignored
def test_out_of_union_training_labels_are_ignored(tmp_path, tok):
    rows = [{"text": r["text"], "label": r["label"]} for r in make_rows(4, seed=1)]
    rows[3]["label"] = "zeta"  # owned by no teacher
    rows[5]["label"] = 2.5
    trainer = make_trainer(tmp_path, tok, fresh_teachers(tok), rows, max_steps=3)
    trainer.train()
    assert trainer.state.global_step == 3


# ---------------------------------------------------------------- 10. clear, early errors
def test_eval_rows_without_gold_labels_are_skipped_by_the_metrics(tmp_path, tok):
    rows = make_rows(3, seed=8)
    labelled = [dict(r) for r in rows]
    mixed = [dict(r) for r in rows]
    for i in range(0, len(mixed), 2):
        mixed[i]["label"] = None if i % 4 == 0 else -1
    mixed += [{"text": r["text"], "label": None} for r in make_rows(2, seed=9)]  # a whole batch without labels
    keep = [r for r in mixed if r["label"] is not None and r["label"] != -1]
    trainer = make_trainer(tmp_path, tok, fresh_teachers(tok), rows, per_device_eval_batch_size=4, strategy="entropy")
    on_mixed = trainer.evaluate(mixed)
    on_labelled = trainer.evaluate(keep)
    assert on_mixed["eval_labelled_rows"] == len(keep) < len(mixed)
    for key in ("eval_accuracy", "eval_macro_f1", "eval_teacher_selection_accuracy"):
        assert on_mixed[key] == pytest.approx(on_labelled[key]), key
    assert labelled  # the untouched rows are only the source of the mixed ones


def test_a_student_vocabulary_smaller_than_its_tokenizer_is_an_early_error(tmp_path, tok):
    with pytest.raises(ValueError, match="token embeddings but its tokenizer has"):
        make_trainer(tmp_path, tok, fresh_teachers(tok), [{"text": "apple"}], student=tiny_bert(4, len(tok) - 5))


def test_float_gold_labels_are_not_truncated():
    space = LabelSpace([["a", "b"], ["c", "d"]])
    assert space.encode([1.0, 3]) == [1, 3]
    with pytest.raises(ValueError, match="not a whole number"):
        space.encode([1.7])


def test_teacher_max_length_below_two_is_rejected(tok):
    model = tiny_bert(2, len(tok), labels=["a", "b"])
    for bad in (1, 0, -3, 2.5):
        with pytest.raises(ValueError, match="max_length must be an int >= 2"):
            Teacher(model, max_length=bad)


def test_certainty_normalization_without_certainty_is_rejected(tmp_path):
    for strategy in ("vanilla_kd", "uhc"):
        with pytest.raises(ValueError, match="uses none"):
            KnowledgeIntegrationConfig(output_dir=str(tmp_path), report_to=[], strategy=strategy,
                                       signal_source="cached", certainty_normalization="standardize")


def test_labels_differing_only_by_case_or_whitespace_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        LabelSpace([["Games", "news"], [" games", "x11"]])
    assert any("differ only by case or whitespace" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        LabelSpace([["games", "news"], ["games", "x11"]])  # a shared label is fine
    assert not any("differ only by case" in r.getMessage() for r in caplog.records)


def test_two_evaluation_sets_with_row_number_ids_do_not_collide(tmp_path, tok):
    train = rows_with_ids()
    trainer = make_trainer(tmp_path, tok, fresh_teachers(tok), train, signal_source="cached")
    first = [{"id": str(i), "text": r["text"], "label": r["label"]} for i, r in enumerate(make_rows(2, seed=8))]
    second = [{"id": str(i), "text": r["text"], "label": r["label"]} for i, r in enumerate(make_rows(2, seed=9))]
    a = trainer.evaluate(first)
    b = trainer.evaluate(second)  # same prefix "eval", same ids "0".., other texts
    assert trainer.evaluate(first)["eval_loss"] == pytest.approx(a["eval_loss"])
    assert a["eval_loss"] != b["eval_loss"]


# ---------------------------------------------------------------- 11. bf16 leaves the user's teachers alone
def test_bf16_does_not_cast_the_users_teacher_modules(tmp_path, tok):
    teachers = fresh_teachers(tok)
    models = [t.model for t in teachers]
    before = [weights(m).clone() for m in models]
    trainer = make_trainer(tmp_path, tok, teachers, [{"text": "apple"}], bf16=True)
    for model, original in zip(models, before):
        assert next(model.parameters()).dtype == torch.float32
        assert torch.equal(weights(model), original)
    assert all(next(t.model.parameters()).dtype == torch.bfloat16 for t in trainer.teachers)


KILLED_PRECOMPUTE = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from test_no_silent_wrong_student import build_tokenizer, fresh_teachers, make_trainer, rows_with_ids
from ki_trainer import signal_cache
import pathlib
signal_cache.store.FLUSH_ROWS = 4
tok = build_tokenizer()
trainer = make_trainer(pathlib.Path(sys.argv[2]), tok, fresh_teachers(tok), rows_with_ids(), signal_source="cached",
                       per_device_eval_batch_size=4)
original = trainer.cached_signals.batches
def killed_after_three_batches(dataset, positions, **kw):
    for n, item in enumerate(original(dataset, positions, **kw)):
        if n == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no except, no finally
        yield item
trainer.cached_signals.batches = killed_after_three_batches
trainer.precompute_teacher_signals()
"""


def test_a_precompute_killed_with_sigkill_keeps_the_flushed_rows(tmp_path, tok):
    import subprocess
    import sys

    import ki_trainer

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(os.path.abspath(ki_trainer.__file__))), os.environ.get("PYTHONPATH")]))}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", KILLED_PRECOMPUTE, tests_dir, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    rows = rows_with_ids()
    again = make_trainer(tmp_path, tok, fresh_teachers(tok), rows, signal_source="cached", per_device_eval_batch_size=4)
    computed = []
    original = again.cached_signals.batches
    again.cached_signals.batches = lambda ds, todo, **kw: (computed.append(len(todo)), original(ds, todo, **kw))[1]
    assert len(again.precompute_teacher_signals()) == len(rows)
    assert computed == [len(rows) - 12]  # the three flushed batches survived the kill
