"""Reliability round 3 (issue 24), MergeDistill: the top-k cache keeps its work and cannot lie, the vocabulary
options say what they emptied, and training runs carry the integrate path's guards. Tiny untrained masked LMs."""

import hashlib
import json

import pytest
import torch
from conftest import build_tokenizer, make_rows
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM

from ki_trainer.merge_distill import MaskedLMTeacher, MergeDistillConfig, MergeDistillTrainer, StudentVocabulary
from ki_trainer.merge_distill import build_student
from ki_trainer.signal_cache import CorruptSignalCacheError, StaleSignalCacheError


def tiny_mlm(vocab_size, seed):
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64))


@pytest.fixture
def teachers():
    tok = build_tokenizer()
    return [MaskedLMTeacher(tiny_mlm(len(tok), 1), tok, languages=["en"], name="a"),
            MaskedLMTeacher(tiny_mlm(len(tok), 2), tok, languages=["de"], name="b")]


def rows(n=24):
    return Dataset.from_list([{"id": f"r{i}", "text": r["text"], "language": "en" if i % 2 else "de"}
                              for i, r in enumerate(make_rows(n // 4, seed=3))])


def make_trainer(teachers, tmp_path, train=None, **config):
    vocabulary = StudentVocabulary.union([t.tokenizer for t in teachers], [t.name for t in teachers])
    student = build_student(vocabulary, teachers, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, per_device_train_batch_size=4,
                    per_device_eval_batch_size=4, save_strategy="no", seed=0, signal_source="cached",
                    signal_cache_dir=str(tmp_path / "cache"), max_steps=2, disable_tqdm=True)
    defaults.update(config)
    return MergeDistillTrainer(model=student, args=MergeDistillConfig(**defaults), teachers=teachers,
                               vocabulary=vocabulary, train_dataset=train if train is not None else rows())


# ---------------------------------------------------------------- the top-k cache
@pytest.mark.parametrize("flush_rows,stop", [(4, KeyboardInterrupt), (None, RuntimeError)],
                         ids=["flushed-every-batch", "flushed-on-the-error"])
def test_a_killed_top_k_precompute_keeps_its_flushed_rows(teachers, tmp_path, monkeypatch, flush_rows, stop):
    from ki_trainer.merge_distill import signals

    if flush_rows is not None:
        monkeypatch.setattr(signals, "FLUSH_ROWS", flush_rows)
    first = make_trainer(teachers, tmp_path)
    original, calls = first.teacher_signal, []

    def dies_in_the_fourth_batch(*args, **kwargs):
        if len(calls) == 3:
            raise stop("killed")
        calls.append(1)
        return original(*args, **kwargs)

    first.teacher_signal = dies_in_the_fourth_batch
    with pytest.raises(stop):
        first.precompute_teacher_signals()
    second = make_trainer(teachers, tmp_path)
    original2, computed = second.teacher_signal, []
    second.teacher_signal = lambda *a, **kw: (computed.append(1), original2(*a, **kw))[1]
    cache = second.precompute_teacher_signals()
    assert len(computed) == 6 - 3  # was 6: the whole cache was written only at the end
    assert len(cache) == 24
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{second.signal_fingerprint()}.safetensors"]


def _tensor_edit(path, name, change):
    """Change tensor ``name`` of a cache file in place (same bytes count): what a damaged or edited file holds."""
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    entry = json.loads(data[8 : 8 + length])[name]
    begin, end = (8 + length + offset for offset in entry["data_offsets"])
    dtype = {"F16": torch.float16, "I32": torch.int32}[entry["dtype"]]
    tensor = torch.frombuffer(data[begin:end], dtype=dtype).clone()
    data[begin:end] = change(tensor).contiguous().view(torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))


def test_a_changed_or_cut_off_top_k_cache_is_one_clear_error_naming_the_file(teachers, tmp_path):
    make_trainer(teachers, tmp_path).precompute_teacher_signals()
    path = next((tmp_path / "cache").iterdir())
    saved = path.read_bytes()
    _tensor_edit(path, "probs", lambda probs: probs * 0.5)  # altered probabilities, same shapes
    with pytest.raises(CorruptSignalCacheError, match=rf"{path.name} is corrupt .*checksum"):
        make_trainer(teachers, tmp_path).precompute_teacher_signals()
    path.write_bytes(saved[: len(saved) // 2])  # cut off
    with pytest.raises(CorruptSignalCacheError, match=rf"{path.name} is corrupt .*delete it"):
        make_trainer(teachers, tmp_path).precompute_teacher_signals()
    path.write_bytes(saved)
    assert len(make_trainer(teachers, tmp_path).precompute_teacher_signals()) == 24


def _save_format_1(path, fingerprint, k, ids, hashes, counts, student_ids, probs, checksum=True):
    """A top-k cache file as MergeDistill wrote them before the signal-cache store (torch.save, format 1)."""
    payload = {"version": 1, "fingerprint": fingerprint, "k": k, "ids_list": list(ids), "text_hashes": list(hashes),
               "counts": list(counts), "ids": student_ids, "probs": probs}
    if checksum:
        hasher = hashlib.sha256(json.dumps([payload["ids_list"], payload["text_hashes"], payload["counts"]]).encode())
        for key in ("ids", "probs"):
            tensor = payload[key].contiguous()
            hasher.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        payload["checksum"] = hasher.hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def test_a_top_k_cache_of_the_earlier_format_is_migrated_not_recomputed(teachers, tmp_path):
    """Caches written before the top-k cache moved onto the signal-cache store (``<fingerprint>.pt`` and a shard in
    ``<fingerprint>.pt.shards/``) are checked as that format was and migrated: no teacher pass, the same signals."""
    fresh = make_trainer(teachers, tmp_path / "fresh")
    cache = fresh.precompute_teacher_signals()
    fingerprint, k = cache.fingerprint, cache.k
    ids = list(cache.index)
    counts = [int(c) for c in cache.read("__counts__", ids)]
    hashes = list(cache.text_hashes)
    expected = cache.lookup(ids, counts)
    old = tmp_path / "cache" / f"{fingerprint}.pt"  # the directory make_trainer points signal_cache_dir at
    head, split = 10, sum(counts[:10])
    _save_format_1(old, fingerprint, k, ids[:head], hashes[:head], counts[:head], cache.ids[:split], cache.probs[:split])
    _save_format_1(old.parent / f"{old.name}.shards" / "123-abc.pt", fingerprint, k, ids[head:], hashes[head:],
                   counts[head:], cache.ids[split:], cache.probs[split:], checksum=False)  # the earliest had none
    trainer = make_trainer(teachers, tmp_path)
    assert trainer.signal_fingerprint() == fingerprint  # the same name before and after
    trainer.teacher_signal = lambda *a, **kw: pytest.fail("a migrated cache must not be recomputed")
    migrated = trainer.precompute_teacher_signals()
    assert len(migrated) == 24 and migrated.path == str(tmp_path / "cache" / f"{fingerprint}.safetensors")
    got = migrated.lookup(ids, counts)
    assert torch.equal(got.ids, expected.ids) and torch.equal(got.probs, expected.probs)
    # a damaged file of the earlier format is one clear error naming it, and nothing is written
    (tmp_path / "cache" / f"{fingerprint}.safetensors").unlink()
    payload = torch.load(old, weights_only=True)
    payload["probs"] = payload["probs"] * 0.5  # changed after writing: the checksum no longer matches
    torch.save(payload, old)
    with pytest.raises(CorruptSignalCacheError, match=rf"{old.name} is corrupt .*checksum"):
        make_trainer(teachers, tmp_path).precompute_teacher_signals()
    assert not (tmp_path / "cache" / f"{fingerprint}.safetensors").exists()


# ---------------------------------------------------------------- the student vocabulary
def test_a_vocabulary_min_count_that_keeps_no_token_names_the_option(teachers):
    from ki_trainer.merge_distill.vocabulary import count_tokens

    texts = [r["text"] for r in make_rows(2, seed=3)]
    counts = [count_tokens(t.tokenizer, texts, 32) for t in teachers]
    with pytest.raises(ValueError, match="min_count=1000 keeps no token.*vocabulary_min_count"):
        StudentVocabulary.union([t.tokenizer for t in teachers], [t.name for t in teachers], counts, min_count=1000)


# ---------------------------------------------------------------- training runs: fingerprint, lock, resume
def checkpointed(teachers, tmp_path, **config):
    return make_trainer(teachers, tmp_path, max_steps=4, save_strategy="steps", save_steps=2, signal_source="on_the_fly",
                        **config)


def weights(model):
    return torch.cat([p.detach().flatten().float() for p in model.parameters()])


def test_resuming_a_merge_distill_run_with_a_teacher_swapped_is_refused(teachers, tmp_path):
    from ki_trainer.checkpoints import CheckpointMismatchError

    checkpointed(teachers, tmp_path).train()
    tok = teachers[1].tokenizer
    swapped = [teachers[0], MaskedLMTeacher(tiny_mlm(len(tok), 7), tok, languages=["de"], name="b")]  # same name
    with pytest.raises(CheckpointMismatchError, match="belongs to another run.*teachers"):
        checkpointed(swapped, tmp_path).train(resume_from_checkpoint=True)  # was: continued silently
    shorter = [MaskedLMTeacher(teachers[0].model, tok, languages=["en"], name="a", max_length=8), teachers[1]]
    with pytest.raises(CheckpointMismatchError, match="belongs to another run.*'max_length': 8"):
        checkpointed(shorter, tmp_path).train(resume_from_checkpoint=True)


def test_a_second_merge_distill_run_on_a_busy_output_dir_is_refused(teachers, tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from ki_trainer.launch import LOCK_NAME, LaunchError

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another live run ...
    try:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid}))
        with pytest.raises(LaunchError, match="Another run is writing"):  # ... holds the directory
            checkpointed(teachers, tmp_path).train()  # was: both "succeed" and mix checkpoints
    finally:
        other.kill()
        other.wait()
    checkpointed(teachers, tmp_path).train()  # its process is gone: the stale lock is taken over


def test_a_merge_distill_checkpoint_cut_off_mid_save_falls_back_to_the_previous_one(teachers, tmp_path, caplog):
    import logging
    import os

    full = checkpointed(teachers, tmp_path / "full", static_masking=True)
    full.train()
    checkpointed(teachers, tmp_path, static_masking=True).train()
    os.remove(tmp_path / "out" / "checkpoint-4" / "trainer_state.json")  # killed while saving checkpoint-4
    resumed = checkpointed(teachers, tmp_path, static_masking=True)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=True)  # was: torch/Trainer error on the incomplete folder
    assert any("checkpoint-4" in r.getMessage() and "cut off" in r.getMessage() for r in caplog.records)
    assert resumed.state.global_step == 4
    torch.testing.assert_close(weights(resumed.model), weights(full.model))


# ---------------------------------------------------------------- NaN never becomes a student
def test_a_nan_teacher_or_loss_stops_merge_distill_instead_of_saving_a_nan_student(teachers, tmp_path):
    from ki_trainer.guards import NonFiniteLossError
    from ki_trainer.querying import TeacherNaNError

    tok = teachers[0].tokenizer
    broken = tiny_mlm(len(tok), 1)
    with torch.no_grad():
        broken.bert.embeddings.word_embeddings.weight[tok.convert_tokens_to_ids("apple")] = float("nan")
    nan_teachers = [MaskedLMTeacher(broken, tok, languages=["en"], name="a"), teachers[1]]
    for signals in ("on_the_fly", "cached"):
        with pytest.raises(TeacherNaNError, match="NaN/inf teacher masked-LM logits"):  # was: loss logged as 0
            make_trainer(nan_teachers, tmp_path / signals, signal_source=signals, max_steps=3).train()
    trainer = make_trainer(teachers, tmp_path / "student", signal_source="on_the_fly", max_steps=3, logging_steps=1,
                           save_strategy="steps", save_steps=1)
    with torch.no_grad():  # any other cause of a NaN loss: here the student itself
        trainer.model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="MergeDistill loss was NaN/inf"):
        trainer.train()
    assert not (tmp_path / "student" / "out" / "checkpoint-1").exists()
    with pytest.raises(NonFiniteLossError):
        trainer.save_model(str(tmp_path / "nan-student"))
    assert not (tmp_path / "nan-student").exists()


def test_the_top_k_cache_reads_like_before_from_memory_shards_and_the_main_file(tmp_path):
    """The flat view (ids, probs, counts, offsets) and lookups agree wherever the rows are: still in memory, in a
    shard, in the compacted main file."""
    from ki_trainer.merge_distill import TopKSignal, TopKSignalCache

    g = torch.Generator().manual_seed(0)
    cache = TopKSignalCache("f" * 20, 3, str(tmp_path / "c.safetensors"))
    counts = [2, 0, 3, 1, 4]
    probs = torch.rand(sum(counts), 3, generator=g)
    signal = TopKSignal(torch.randint(0, 50, (sum(counts), 3), generator=g), probs, probs.sum(-1))
    ids = [f"r{i}" for i in range(5)]
    cache.add(ids[:3], ["a", "b", "c"], counts[:3], TopKSignal(signal.ids[:5], signal.probs[:5], signal.kept_mass[:5]))
    cache.flush()
    cache.add(ids[3:], ["d", "e"], counts[3:], TopKSignal(signal.ids[5:], signal.probs[5:], signal.kept_mass[5:]))
    for view in (cache, cache.save() and TopKSignalCache.open(cache.path, cache.fingerprint, 3)):
        assert view.counts == counts and view.offsets.tolist() == [0, 2, 2, 5, 6, 10]
        assert torch.equal(view.ids, signal.ids.to(torch.int32)) and torch.equal(view.probs, probs.half())
        got = view.lookup(["r4", "r1", "r0"], [4, 0, 2])
        assert torch.equal(got.ids, torch.cat([signal.ids[6:], signal.ids[:2]]))
        torch.testing.assert_close(got.kept_mass, got.probs.sum(-1))
        assert view.check_text("r2", "c") and not view.check_text("r9", "x")
        with pytest.raises(StaleSignalCacheError, match="3 masked positions now, 4 when cached"):
            view.lookup(["r4"], [3])
