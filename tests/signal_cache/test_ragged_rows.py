"""Ragged rows on the signal-cache store: rows with any number of entries (MergeDistill's top-k signals of each
masked position), written, sharded, checksummed, merged and read like fixed-size rows."""

import json

import numpy as np
import pytest
import torch

from ki_trainer import signal_cache
from ki_trainer.signal_cache import CorruptSignalCacheError, TeacherSignalCache
from ki_trainer.signal_cache.file_format import COUNTS


def ragged(ids, seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (len(ids),), generator=g)  # rows with no entry too
    total = int(counts.sum())
    return {COUNTS: counts.to(torch.int64), "ids": torch.randint(0, 1000, (total, k), generator=g).to(torch.int32),
            "probs": torch.rand(total, k, generator=g).half()}


def expected_entries(rows_by_id, ids, name):
    return torch.cat([rows_by_id[i][name] for i in ids]) if ids else None


def split_rows(ids, rows):
    """{id: {name: that row's entries}}"""
    offsets = np.concatenate([[0], np.cumsum(rows[COUNTS].numpy())])
    return {i: {name: rows[name][offsets[r]:offsets[r + 1]] for name in ("ids", "probs")} for r, i in enumerate(ids)}


def test_ragged_rows_round_trip_through_memory_shards_and_the_main_file(tmp_path, monkeypatch):
    monkeypatch.setattr(signal_cache.file_format, "BLOCK_ROWS", 4)  # many blocks, rows crossing part boundaries
    path = str(tmp_path / "c.safetensors")
    cache = TeacherSignalCache("fp", [3], path)
    by_id = {}
    for batch in range(5):
        ids = [f"r{batch}-{i}" for i in range(7)]
        rows = ragged(ids, seed=batch)
        cache.add_rows(ids, [hash(i) % 1000 for i in ids], rows)
        by_id.update(split_rows(ids, rows))
        if batch in (1, 3):
            cache.flush()  # some rows in shard files, some still in memory
    wanted = ["r4-6", "r0-0", "r2-3", "r1-1", "r3-5", "r0-0"]
    for name in ("ids", "probs"):
        assert torch.equal(cache.read(name, wanted), expected_entries(by_id, wanted, name))
    assert cache.read(COUNTS, wanted).tolist() == [len(by_id[i]["ids"]) for i in wanted]
    cache.save()
    again = TeacherSignalCache.load(path, "fp", [3])
    assert len(again) == 35 and again.nbytes() == cache.nbytes()
    for name in ("ids", "probs"):
        assert torch.equal(again.read(name, wanted), expected_entries(by_id, wanted, name))
    assert again.read("ids", []).shape == (0, 3)


def test_a_changed_entry_of_a_ragged_file_is_a_corrupt_cache_naming_the_file_and_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(signal_cache.file_format, "BLOCK_ROWS", 4)
    path = tmp_path / "c.safetensors"
    ids = [f"r{i}" for i in range(12)]
    rows = ragged(ids, seed=1)
    rows[COUNTS][5] = 3  # row 5 (block 1) holds entries
    rows = {COUNTS: rows[COUNTS], "ids": torch.arange(int(rows[COUNTS].sum()) * 3, dtype=torch.int32).view(-1, 3),
            "probs": torch.rand(int(rows[COUNTS].sum()), 3).half()}
    cache = TeacherSignalCache("fp", [3], str(path))
    cache.add_rows(ids, list(range(12)), rows)
    cache.save()
    entry = int(rows[COUNTS][:5].sum())  # the first entry of row 5
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    begin = 8 + length + json.loads(data[8 : 8 + length])["ids"]["data_offsets"][0]
    data[begin + entry * 3 * 4] ^= 0xFF  # int32 entries of 3 ids each
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptSignalCacheError, match=r"c\.safetensors is corrupt \(checksum mismatch in rows 4\.\.7"):
        TeacherSignalCache.load(str(path), "fp", [3])


def test_ragged_rows_are_checked_when_added():
    cache = TeacherSignalCache("fp", [3])
    rows = ragged(["a", "b"], seed=2)
    with pytest.raises(ValueError, match="announced by the counts"):
        cache.add_rows(["a", "b"], [1, 2], {**rows, "probs": torch.zeros(int(rows[COUNTS].sum()) + 1, 3).half()})
    with pytest.raises(ValueError, match="int64 tensor of entry counts"):
        cache.add_rows(["a", "b"], [1, 2], {**rows, COUNTS: rows[COUNTS].to(torch.int32)})
    cache.add_rows(["a", "b"], [1, 2], rows)
    with pytest.raises(ValueError, match="cannot join a cache holding"):  # fixed-size rows never mix with ragged ones
        cache.add_rows(["c"], [3], {"ids": torch.zeros(1, 3, dtype=torch.int32), "probs": torch.zeros(1, 3).half()})
