"""Teacher-signal precompute split across processes: two gloo CPU processes (forked with
torch.multiprocessing: no `accelerate launch`, no second import of the stack) each compute half of the missing rows, and every process ends with the same cache
as one process computing everything, MC dropout included."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TEACHER_SPLIT, build_tokenizer, make_rows, tiny_bert
from accelerate.state import AcceleratorState
from datasets import Dataset

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher
from ki_trainer.signal_cache import shard_positions

NAMES = ("logits", "certainty", "mutual_information", "top_variance")


def _rows() -> Dataset:
    return Dataset.from_list([{"id": f"r{i}", "text": r["text"]} for i, r in enumerate(make_rows(6, seed=5))])


def _trainer(out: str, cache_dir: str, dataset) -> KnowledgeIntegrationTrainer:
    tok = build_tokenizer()
    teachers = [Teacher(tiny_bert(2, len(tok), labels=labels, seed=i, dropout=0.3), name=f"t{i}")
                for i, labels in enumerate(TEACHER_SPLIT)]
    args = KnowledgeIntegrationConfig(
        output_dir=out, strategy="muki", router="mc_entropy", signal_source="cached", signal_cache_dir=cache_dir, mc_samples=4,
        per_device_eval_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
        max_steps=1,
    )
    return KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), seed=3), args=args, teachers=teachers,
                                       train_dataset=dataset, processing_class=tok)


def _signals(cache, ids) -> dict[str, torch.Tensor]:
    found = cache.lookup(ids, "mc")
    return {"logits": torch.cat(found.logits, 1), "certainty": found.certainty,
            "mutual_information": found.mutual_information, "top_variance": found.top_variance}


def _worker(rank: int, world: int, port: int, out: str, fail_rank: int = -1, streaming: bool = False,
            own_cache_dir: bool = False) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from the single-process test process
    data = _rows()
    cache_dir = os.path.join(out, f"cache_rank{rank}" if own_cache_dir else "cache")  # own: node-local disks
    trainer = _trainer(os.path.join(out, "run"), cache_dir, data.to_iterable_dataset() if streaming else data)
    assert trainer.accelerator.num_processes == world
    computed = []  # the dataset positions this process computed
    original = trainer.cached_signals.rows
    trainer.cached_signals.rows = lambda rows, features=None, mc=True: (
        computed.extend(int(row["id"][1:]) for row in rows), original(rows, features, mc))[1]
    if rank == fail_rank:
        def broken(ds, todo, **kw):
            raise ValueError("teacher broke on this rank")
            yield

        trainer.cached_signals.batches = broken
    try:
        cache = trainer.precompute_teacher_signals()
    except Exception as err:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(err).__name__}: {err}")
        return
    torch.save({"rows": computed, "signals": _signals(cache, list(data["id"])), "size": len(cache)},
               os.path.join(out, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rows_are_dealt_in_whole_batches():
    todo = list(range(3, 14))
    shares = [shard_positions(todo, rank, 2, 4) for rank in (0, 1)]
    assert shares == [[3, 4, 5, 6, 11, 12, 13], [7, 8, 9, 10]]
    assert shard_positions(todo, 0, 1, 4) == todo


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "iterable"])
def test_two_processes_precompute_the_single_process_cache(tmp_path, streaming):
    data = _rows()
    ids = list(data["id"])
    torch.set_num_threads(1)
    alone = _trainer(str(tmp_path / "alone"), str(tmp_path / "alone_cache"), data).precompute_teacher_signals()
    reference = _signals(alone, ids)

    # An earlier (interrupted) run cached the first 8 rows: the two processes compute only the other 16.
    _trainer(str(tmp_path / "early"), str(tmp_path / "cache"), data.select(range(8))).precompute_teacher_signals()
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), -1, streaming), nprocs=2, join=True,
                       start_method="fork")

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sorted(ranks[0]["rows"] + ranks[1]["rows"]) == list(range(8, 24))  # each missing row once
    assert len(ranks[0]["rows"]) == len(ranks[1]["rows"]) == 8
    for rank in ranks:
        assert rank["size"] == len(data)  # every process sees the whole cache
        for name in NAMES:  # MC dropout included: the draws follow the batch's ids, not the process
            torch.testing.assert_close(rank["signals"][name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not (tmp_path / "cache").joinpath(os.path.basename(alone.path) + ".shards").exists()  # compacted
    assert json.dumps(sorted(os.listdir(tmp_path / "cache"))) == json.dumps([os.path.basename(alone.path)])


def test_a_failing_process_stops_every_process_and_keeps_the_others_rows(tmp_path):
    data = _rows()
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), 1), nprocs=2, join=True, start_method="fork")
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in (0, 1)]
    assert errors[1] == "ValueError: teacher broke on this rank"  # its own error
    assert errors[0].startswith("RuntimeError: 1 other process(es) failed while computing teacher signals")
    again = _trainer(str(tmp_path / "again"), str(tmp_path / "cache"), data)
    computed = []
    original = again.cached_signals.batches
    again.cached_signals.batches = lambda ds, todo, **kw: (computed.extend(todo), original(ds, todo, **kw))[1]
    assert len(again.precompute_teacher_signals()) == len(data)
    assert computed == shard_positions(list(range(len(data))), 1, 2, 4)  # rank 0's share was kept in its shards


def test_a_process_that_computes_nothing_still_sees_the_other_processes_rows(tmp_path):
    data = _rows()
    # 20 of 24 rows cached: the one missing batch (4 rows) goes to rank 0, rank 1 computes nothing.
    _trainer(str(tmp_path / "early"), str(tmp_path / "cache"), data.select(range(20))).precompute_teacher_signals()
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sorted(ranks[0]["rows"]) == [20, 21, 22, 23] and ranks[1]["rows"] == []
    assert ranks[0]["size"] == ranks[1]["size"] == len(data)
    for name in NAMES:
        torch.testing.assert_close(ranks[1]["signals"][name], ranks[0]["signals"][name], msg=name)


def test_a_cache_dir_that_the_processes_do_not_share_is_a_clear_error(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), -1, False, True), nprocs=2, join=True,
                       start_method="fork")
    for rank in (0, 1):  # each process saw only its own half: none trains on a partial cache
        error = (tmp_path / f"rank{rank}.err").read_text()
        assert "signal_cache_dir must be ONE directory that every process reads and writes" in error or \
            error.startswith("RuntimeError: 1 other process(es) failed while checking"), error
    assert "missing from" in (tmp_path / "rank0.err").read_text() + (tmp_path / "rank1.err").read_text()


def test_the_ids_of_a_stream_are_never_another_streams(tmp_path):
    import gc

    data = _rows()
    trainer = _trainer(str(tmp_path / "run"), str(tmp_path / "cache"), data)
    for start in (0, 6, 12):  # temporary streams, freed in turn: a new one may reuse a freed one's address
        stream = data.select(range(start, start + 6)).to_iterable_dataset()
        assert trainer.cached_signals.dataset_ids(stream) == [f"r{i}" for i in range(start, start + 6)]
        del stream
        gc.collect()
    assert len(trainer.cached_signals.streamed_ids) <= 1  # entries of freed streams are dropped
