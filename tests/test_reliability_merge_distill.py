"""Reliability round 3 (issue 24), MergeDistill: the top-k cache keeps its work and cannot lie, the vocabulary
options say what they emptied, and training runs carry the integrate path's guards. Tiny untrained masked LMs."""

import pytest
import torch
from conftest import build_tokenizer, make_rows
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM

from ki_trainer.merge_distill import MaskedLMTeacher, MergeDistillConfig, MergeDistillTrainer, StudentVocabulary
from ki_trainer.merge_distill import build_student
from ki_trainer.signal_cache import CorruptSignalCacheError


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
                    per_device_eval_batch_size=4, save_strategy="no", seed=0, teacher_signals="cached",
                    signal_cache_dir=str(tmp_path / "cache"), max_steps=2, disable_tqdm=True)
    defaults.update(config)
    return MergeDistillTrainer(model=student, args=MergeDistillConfig(**defaults), teachers=teachers,
                               vocabulary=vocabulary, train_dataset=train if train is not None else rows())


# ---------------------------------------------------------------- the top-k cache
def test_a_killed_top_k_precompute_keeps_its_flushed_rows(teachers, tmp_path, monkeypatch):
    from ki_trainer.merge_distill import signals

    monkeypatch.setattr(signals, "FLUSH_ROWS", 4)
    first = make_trainer(teachers, tmp_path)
    original, calls = first.teacher_signal, []

    def dies_in_the_fourth_batch(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return original(*args, **kwargs)

    first.teacher_signal = dies_in_the_fourth_batch
    with pytest.raises(KeyboardInterrupt):
        first.precompute_teacher_signals()
    second = make_trainer(teachers, tmp_path)
    original2, computed = second.teacher_signal, []
    second.teacher_signal = lambda *a, **kw: (computed.append(1), original2(*a, **kw))[1]
    cache = second.precompute_teacher_signals()
    assert len(computed) == 6 - 3  # was 6: the whole cache was written only at the end
    assert len(cache) == 24
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{second.signal_fingerprint()}.pt"]


def _payload_edit(path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def test_a_changed_or_cut_off_top_k_cache_is_one_clear_error_naming_the_file(teachers, tmp_path):
    make_trainer(teachers, tmp_path).precompute_teacher_signals()
    path = next((tmp_path / "cache").iterdir())
    saved = path.read_bytes()
    _payload_edit(path, lambda p: p["probs"].mul_(0.5))  # altered probabilities, same shapes
    with pytest.raises(CorruptSignalCacheError, match=rf"{path.name} is corrupt .*checksum"):
        make_trainer(teachers, tmp_path).precompute_teacher_signals()
    path.write_bytes(saved[: len(saved) // 2])  # cut off
    with pytest.raises(CorruptSignalCacheError, match=rf"{path.name} is corrupt .*delete it"):
        make_trainer(teachers, tmp_path).precompute_teacher_signals()
    path.write_bytes(saved)
    assert len(make_trainer(teachers, tmp_path).precompute_teacher_signals()) == 24


# ---------------------------------------------------------------- the student vocabulary
def test_a_vocabulary_min_count_that_keeps_no_token_names_the_option(teachers):
    from ki_trainer.merge_distill.vocabulary import count_tokens

    texts = [r["text"] for r in make_rows(2, seed=3)]
    counts = [count_tokens(t.tokenizer, texts, 32) for t in teachers]
    with pytest.raises(ValueError, match="min_count=1000 keeps no token.*vocabulary_min_count"):
        StudentVocabulary.union([t.tokenizer for t in teachers], [t.name for t in teachers], counts, min_count=1000)
