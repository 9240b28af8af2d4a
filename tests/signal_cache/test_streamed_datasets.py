"""Training sets that can only be iterated (`datasets.IterableDataset`, streaming): on-the-fly signals as with
any dataset; cached signals precomputed in one pass over the stream (ids required), equal to the map-style cache."""

from __future__ import annotations

import pytest
import torch
from conftest import TEACHER_SPLIT, build_tokenizer, make_rows, tiny_bert
from datasets import Dataset

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher


@pytest.fixture
def rows() -> Dataset:
    return Dataset.from_list([{"id": f"s{i}", "text": r["text"]} for i, r in enumerate(make_rows(5, seed=11))])


def _trainer(tmp_path, dataset, mode: str, name: str, **overrides) -> KnowledgeIntegrationTrainer:
    tok = build_tokenizer()
    teachers = [Teacher(tiny_bert(2, len(tok), labels=labels, seed=i, dropout=0.3), name=f"t{i}")
                for i, labels in enumerate(TEACHER_SPLIT)]
    settings = dict(output_dir=str(tmp_path / name), strategy="muki", router="mc_entropy", signal_source=mode,
                    signal_cache_dir=str(tmp_path / f"cache_{name}"), mc_samples=4, per_device_eval_batch_size=3,
                    per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True,
                    disable_tqdm=True, save_strategy="no", seed=0)
    settings.update(overrides)
    return KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), seed=3), args=KnowledgeIntegrationConfig(**settings),
                                       teachers=teachers, train_dataset=dataset, processing_class=tok)


@pytest.mark.parametrize("mode", ["on_the_fly", "cached"])
def test_an_iterable_train_set_trains(tmp_path, rows, mode):
    trainer = _trainer(tmp_path, rows.to_iterable_dataset(), mode, mode)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_an_iterable_train_set_trains_with_the_cached_default_router(tmp_path, rows):
    """muki's cached default (relative_mahalanobis) is fitted on the streamed pool's cached signals."""
    trainer = _trainer(tmp_path, rows.to_iterable_dataset(), "cached", "default", router=None)
    assert trainer.router.name == "relative_mahalanobis"
    trainer.train()
    assert trainer.router.fitted and trainer.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_streamed_precompute_equals_the_map_style_cache(tmp_path, rows):
    mapped = _trainer(tmp_path, rows, "cached", "mapped").precompute_teacher_signals()
    streamed_trainer = _trainer(tmp_path, rows.to_iterable_dataset(), "cached", "streamed",
                                certainty_normalization="standardize")
    streamed = streamed_trainer.precompute_teacher_signals()  # one pass; the standardization reuses its ids
    ids = list(rows["id"])
    assert len(streamed) == len(rows) and streamed_trainer.cached_signals.dataset_ids(streamed_trainer.train_dataset) == ids
    a, b = mapped.lookup(ids, "mc"), streamed.lookup(ids, "mc")
    torch.testing.assert_close(torch.cat(b.logits, 1), torch.cat(a.logits, 1))
    torch.testing.assert_close(b.certainty, a.certainty)  # the same batches, so the same MC draws
    torch.testing.assert_close(b.mutual_information, a.mutual_information)
    assert streamed_trainer.certainty_statistics is not None
    again = _trainer(tmp_path, rows.to_iterable_dataset(), "cached", "streamed")
    calls = []
    original = again.cached_signals.rows
    again.cached_signals.rows = lambda batch, features=None, mc=True: (calls.append(len(batch)), original(batch, features, mc))[1]
    again.precompute_teacher_signals()
    assert calls == []  # every streamed row was already cached


def test_an_iterable_train_set_without_ids_is_an_early_error_in_cached_mode(tmp_path, rows):
    stream = rows.remove_columns("id").to_iterable_dataset()
    with pytest.raises(ValueError, match="IterableDataset without an example id column 'id'.*on_the_fly"):
        _trainer(tmp_path, stream, "cached", "noids")


class _Rows(torch.utils.data.IterableDataset):
    """A plain torch IterableDataset of dict rows (no `datasets`, no declared columns)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_a_bad_streamed_row_is_named_by_its_position(tmp_path, rows):
    plain = [dict(row) for row in rows]
    trainer = _trainer(tmp_path, _Rows(plain), "cached", "plain")
    assert len(trainer.precompute_teacher_signals()) == len(plain)  # a plain torch IterableDataset works too
    plain[7]["text"] = 7
    trainer = _trainer(tmp_path, _Rows(plain), "cached", "bad")
    with pytest.raises(ValueError, match=r"streamed dataset: column 'text' at row 7 \(id 's7'\) is int"):
        trainer.precompute_teacher_signals()
