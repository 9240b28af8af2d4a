"""Cache files: memory-mapped (a lookup reads only its rows, a pool larger than RAM is never loaded whole),
readable by safetensors, block checksums checked lazily for large files, old formats refused clearly."""

from __future__ import annotations

import json
import os
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from ki_trainer import signal_cache
from ki_trainer.signal_cache import CorruptSignalCacheError, StaleSignalCacheError, TeacherSignalCache

WIDTH = 256


def _big_cache(path, rows: int) -> dict[str, torch.Tensor]:
    cache = TeacherSignalCache("fp", [WIDTH // 2, WIDTH // 2], str(path))
    generator = torch.Generator().manual_seed(0)
    tensors = {"logits": torch.randn(rows, WIDTH, generator=generator), "mc": torch.rand(rows, 2, generator=generator),
               "bf": torch.randn(rows, 3, generator=generator).bfloat16()}
    ids = [f"row{i}" for i in range(rows)]
    for lo in range(0, rows, 1000):  # several shards, compacted by save()
        cache.add_rows(ids[lo : lo + 1000], list(range(lo, min(lo + 1000, rows))),
                       {k: v[lo : lo + 1000] for k, v in tensors.items()})
        cache.flush()
    cache.save()
    return tensors


def _data_end(path, name: str) -> int:
    """Byte position where tensor ``name``'s data ends in a cache file (safetensors layout)."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return 8 + length + json.loads(raw[8 : 8 + length])[name]["data_offsets"][1]


def test_loading_and_looking_up_reads_only_the_requested_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(signal_cache.file_format, "VERIFY_EAGER_BYTES", 0)  # as for a file larger than the limit
    monkeypatch.setattr(signal_cache.file_format, "BLOCK_ROWS", 512)
    rows = 8000
    tensors = _big_cache(tmp_path / "fp.safetensors", rows)
    data_bytes = rows * WIDTH * 4
    tracemalloc.start()
    try:
        cache = TeacherSignalCache.load(str(tmp_path / "fp.safetensors"), "fp", [WIDTH // 2, WIDTH // 2])
        picked = [7, 4000, 7999]
        found = cache.lookup([f"row{i}" for i in picked], "mc")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # ids and text hashes (~100 bytes a row) are in memory; the 8 MB of logits are not (3 blocks were read)
    assert peak < data_bytes / 4, peak
    torch.testing.assert_close(torch.cat(found.logits, 1), tensors["logits"][picked], rtol=0, atol=0)
    torch.testing.assert_close(found.certainty, tensors["mc"][picked], rtol=0, atol=0)
    assert torch.equal(cache.tensors["bf"], tensors["bf"])  # bfloat16 round-trips (stored as int16 bits)


def test_cache_files_are_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = _big_cache(tmp_path / "fp.safetensors", 1500)
    with safe_open(str(tmp_path / "fp.safetensors"), framework="pt") as f:
        assert f.metadata()["fingerprint"] == "fp"
        assert torch.equal(f.get_tensor("logits"), tensors["logits"])


def test_a_damaged_block_of_a_large_file_is_found_when_read(tmp_path, monkeypatch):
    monkeypatch.setattr(signal_cache.file_format, "BLOCK_ROWS", 512)
    path = tmp_path / "fp.safetensors"
    _big_cache(path, 2000)
    data = bytearray(path.read_bytes())
    data[_data_end(path, "logits") - 3] ^= 0x10  # the last row of the logits: block 3 (rows 1536..1999)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptSignalCacheError, match="checksum mismatch in rows 1536..1999"):
        TeacherSignalCache.load(str(path), "fp", [WIDTH // 2, WIDTH // 2])  # small file: checked when opened
    monkeypatch.setattr(signal_cache.file_format, "VERIFY_EAGER_BYTES", 0)
    cache = TeacherSignalCache.load(str(path), "fp", [WIDTH // 2, WIDTH // 2])
    cache.lookup(["row0", "row1535"], "mc")  # undamaged blocks read fine
    with pytest.raises(CorruptSignalCacheError, match=rf"{path}.*checksum mismatch in rows 1536..1999.*delete it"):
        cache.lookup(["row1600"], "mc")


def test_a_cache_file_of_the_previous_format_is_refused_clearly(tmp_path):
    path = tmp_path / "fp.safetensors"
    torch.save({"version": 2, "fingerprint": "fp", "ids": ["a"], "tensors": {"logits": torch.zeros(1, 4)}}, path)
    with pytest.raises(StaleSignalCacheError, match="older ki-trainer .*format 2.*Delete it"):
        TeacherSignalCache.load(str(path), "fp", [2, 2])


def test_lookups_cross_files_and_rows_still_in_memory(tmp_path):
    path = tmp_path / "fp.safetensors"
    cache = TeacherSignalCache("fp", [1, 1], str(path))
    cache.add_rows(["a", "b"], [1, 2], {"logits": torch.tensor([[1.0, 1.0], [2.0, 2.0]])})
    cache.flush()  # "a", "b" now read back from the shard
    cache.add_rows(["c"], [3], {"logits": torch.tensor([[3.0, 3.0]])})  # "c" only in memory
    assert cache.lookup(["c", "a", "b"], None).logits[0].flatten().tolist() == [3.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="cannot join a cache holding"):
        cache.add_rows(["d"], [4], {"logits": torch.ones(1, 2), "other": torch.ones(1)})
    cache.save()
    assert not (tmp_path / "fp.safetensors.shards").exists()
    loaded = TeacherSignalCache.load(str(path), "fp", [1, 1])
    assert loaded.lookup(["b", "c"], None).logits[1].flatten().tolist() == [2.0, 3.0]
    assert np.array_equal(loaded.text_hashes, [1, 2, 3])


def _legacy_file(path, fingerprint: str, ids, tensors) -> None:
    """A cache file as ki-trainer wrote it before the memory-mapped format (cache format 2: torch.save)."""
    import hashlib

    hashes = [signal_cache.text_hash(f"text {i}") for i in ids]
    hasher = hashlib.sha256(json.dumps([list(ids), hashes]).encode())
    for name in sorted(tensors):
        hasher.update(name.encode())
        signal_cache._hash_tensor(hasher.update, tensors[name])
    torch.save({"version": 2, "fingerprint": fingerprint, "label_sizes": [2, 2], "ids": list(ids), "text_hashes": hashes,
                "tensors": tensors, "checksum": hasher.hexdigest()}, path)


def test_a_cache_of_the_previous_format_is_migrated_not_recomputed(tmp_path):
    ids = ["a", "b", "c"]
    tensors = {"logits": torch.rand(3, 4), "mc": torch.rand(3, 2)}
    _legacy_file(tmp_path / "fp.pt", "fp", ids, tensors)
    (tmp_path / "fp.pt.shards").mkdir()
    _legacy_file(tmp_path / "fp.pt.shards" / "w-000000.pt", "fp", ["d"], {"logits": torch.rand(1, 4), "mc": torch.rand(1, 2)})
    path = str(tmp_path / "fp.safetensors")
    assert TeacherSignalCache.exists(path)
    cache = TeacherSignalCache.load(path, "fp", [2, 2])
    assert sorted(cache.index) == ["a", "b", "c", "d"] and (tmp_path / "fp.safetensors").exists()
    torch.testing.assert_close(torch.cat(cache.lookup(ids, "mc").logits, 1), tensors["logits"], rtol=0, atol=0)
    assert cache.missing(["b", "e"], ["text b", "new"]) == [1]  # the text hashes came along

    _legacy_file(tmp_path / "other.pt", "fp", ids, tensors)
    raw = bytearray((tmp_path / "other.pt").read_bytes())
    position = raw.find(tensors["logits"].numpy().tobytes()[:8])
    raw[position] ^= 0x01  # bit rot in a legacy file: refused as before, never migrated
    (tmp_path / "other.pt").write_bytes(bytes(raw))
    with pytest.raises(CorruptSignalCacheError, match="other.pt is corrupt"):
        TeacherSignalCache.load(str(tmp_path / "other.safetensors"), "fp", [2, 2])
    assert not (tmp_path / "other.safetensors").exists()


def test_the_fingerprint_of_a_teacher_set_is_the_one_format_2_used(monkeypatch):
    """Format 2 and 3 files of the same teachers share a fingerprint (the format lives in each file's header)."""
    assert signal_cache._FINGERPRINT_FORMAT == 2
    monkeypatch.setattr(signal_cache.file_format, "CACHE_FORMAT_VERSION", 99)
    model = torch.nn.Linear(2, 2)
    teacher = type("T", (), {"tokenizer": None, "labels": ["x", "y"], "model": model})()
    first = signal_cache.teachers_fingerprint([teacher], None, [8], 4, torch.float32)
    monkeypatch.setattr(signal_cache.file_format, "CACHE_FORMAT_VERSION", 3)
    assert signal_cache.teachers_fingerprint([teacher], None, [8], 4, torch.float32) == first


def test_fingerprints_of_several_kinds_at_once_equal_the_single_ones_and_stay_pinned():
    """Caches on disk are named by these hashes: reading the weights once for several kinds must not change them
    (the values were computed before ``teachers_fingerprints`` existed)."""
    model = torch.nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.arange(6.0).reshape(3, 2))
        model.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    teacher = type("T", (), {"tokenizer": None, "labels": ["x", "y", "z"], "model": model})()
    kinds = [(4, None, False), (0, None, True), (8, 1, True)]
    pinned = ["36908b800f0134123108", "a695d00706159c97bb2a", "e7e14167512208bb803f"]
    single = [signal_cache.teachers_fingerprint([teacher], None, [8], k, torch.float32, mc_top_layers=t, features=f)
              for k, t, f in kinds]
    assert single == pinned
    assert signal_cache.teachers_fingerprints([teacher], None, [8], torch.float32, kinds) == pinned


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _add(cache, ids) -> None:
    cache.add_rows(ids, [signal_cache.text_hash(i) for i in ids],
                   {"logits": torch.tensor([[float(len(i)), float(hash(i) % 97)] for i in ids])})


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_many_flushes_keep_the_open_files_bounded_and_load_still_works(tmp_path):
    """One descriptor per flushed shard until compaction ran a long precompute into EMFILE (a 1024 soft limit is
    ~4M rows), and the next run could not load the shards it left. Under a soft limit of 80 more descriptors: a
    writer flushes 150 times (its own shards are merged), 40 other writers leave a shard each (loading merges
    them in batches), and every row is read back."""
    resource = pytest.importorskip("resource")
    path = str(tmp_path / "fp.safetensors")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    baseline = _open_fds()
    # 80 more descriptors (new ones take the lowest free numbers): a save() holds its own parts and the files it
    # compacts, at most MAX_OPEN_SHARDS + 1 each
    resource.setrlimit(resource.RLIMIT_NOFILE, (baseline + 80, hard))
    try:
        cache = TeacherSignalCache("fp", [1, 1], path)
        most = 0
        for k in range(150):
            _add(cache, [f"w{k}a", f"w{k}b"])
            cache.flush()
            most = max(most, _open_fds() - baseline)
        assert most <= 2 * signal_cache.SHARD_MERGE_FANOUT
        assert torch.cat(cache.lookup(["w0a", "w149b"], None).logits, 1)[0].tolist() == [3.0, hash("w0a") % 97]
        del cache
        for k in range(40):  # other writers (processes, ranks), one shard each
            other = TeacherSignalCache("fp", [1, 1], path)
            _add(other, [f"o{k}"])
            other.flush()
            del other
        assert len(os.listdir(path + ".shards")) > signal_cache.MAX_OPEN_SHARDS
        loaded = TeacherSignalCache.load(path, "fp", [1, 1])
        assert len(loaded) == 340 and len(os.listdir(path + ".shards")) <= signal_cache.MAX_OPEN_SHARDS
        assert _open_fds() - baseline <= signal_cache.MAX_OPEN_SHARDS + 1
        assert torch.cat(loaded.lookup(["o39", "w77b"], None).logits, 1)[0].tolist() == [3.0, hash("o39") % 97]
        loaded.save()
        assert _open_fds() - baseline == 1  # the compacted main file only: the shards' maps were closed
        assert len(TeacherSignalCache.load(path, "fp", [1, 1])) == 340
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    part = signal_cache.file_format._FilePart(path, "fp")
    opened = _open_fds()
    part.close()
    assert _open_fds() == opened - 1  # close() releases the map's descriptor


def test_a_format_2_migration_holds_the_directory_lock(tmp_path, monkeypatch):
    """load() migrated a format-2 cache without the lock: a save() of new rows landing meanwhile was overwritten by
    the slower migration (the rows lost from disk). The migration now runs under the directory lock."""
    pytest.importorskip("fcntl")
    _legacy_file(tmp_path / "fp.pt", "fp", ["a", "b"], {"logits": torch.rand(2, 4)})
    path = str(tmp_path / "fp.safetensors")
    migrating, saved = threading.Event(), threading.Event()
    real = signal_cache.legacy._read_legacy

    def slow_read(*args):
        part = real(*args)
        if threading.current_thread().name == "loader":
            migrating.set()
            saved.wait(0.5)  # a big legacy file: the save() below lands before the migration writes (unless locked)
        return part

    monkeypatch.setattr(signal_cache.legacy, "_read_legacy", slow_read)
    loader = threading.Thread(target=TeacherSignalCache.load, args=(path, "fp", [2, 2]), name="loader")
    loader.start()
    assert migrating.wait(10)
    saver = TeacherSignalCache("fp", [2, 2], path)
    saver.add_rows(["new"], [signal_cache.text_hash("new")], {"logits": torch.zeros(1, 4)})
    saver.save()
    saved.set()
    loader.join(10)
    assert sorted(TeacherSignalCache.load(path, "fp", [2, 2]).index) == ["a", "b", "new"]


def test_a_file_replaced_while_it_is_opened_is_read_as_one_file(tmp_path, monkeypatch):
    """The header came through one open() and the rows through a second: a compaction replacing the file in between
    made a healthy cache look corrupt. One descriptor now serves the size, the header and the rows."""
    path = str(tmp_path / "fp.safetensors")
    for target, n in ((path, 10), (path + ".new", 20)):  # the other writer's compacted version has more rows
        cache = TeacherSignalCache("fp", [1, 1], target)
        _add(cache, [str(i) for i in range(n)])
        cache.save(target)
    real_open = open

    def racing_open(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        if file == path and os.path.exists(path + ".new"):
            os.replace(path + ".new", path)  # the other process's save() lands right after this open
        return handle

    monkeypatch.setattr(signal_cache.file_format, "open", racing_open, raising=False)
    assert len(TeacherSignalCache.load(path, "fp", [1, 1])) == 10  # the file as it was opened, whole
    assert len(TeacherSignalCache.load(path, "fp", [1, 1])) == 20
    open(tmp_path / "empty.safetensors", "wb").close()
    with pytest.raises(CorruptSignalCacheError, match="empty.safetensors is corrupt .*0 bytes"):
        TeacherSignalCache.load(str(tmp_path / "empty.safetensors"), "fp", [1, 1])


def test_loading_while_another_save_removes_the_shard_directory(tmp_path, monkeypatch):
    path = str(tmp_path / "fp.safetensors")
    cache = TeacherSignalCache("fp", [1, 1], path)
    _add(cache, ["a"])
    cache.save()
    os.mkdir(path + ".shards")
    real = os.listdir

    def listdir(directory="."):
        if str(directory).endswith(".shards"):  # the other process's save() removed it (empty) just now
            raise FileNotFoundError(2, "No such file or directory", str(directory))
        return real(directory)

    monkeypatch.setattr(os, "listdir", listdir)
    assert list(TeacherSignalCache.load(path, "fp", [1, 1]).index) == ["a"]


def test_a_shard_merged_away_while_loading_is_found_in_its_new_file(tmp_path, monkeypatch):
    """A writer merges its own shards (new file first, then the old ones deleted): a loader that listed an old one
    reads the directory again instead of missing its rows."""
    path = str(tmp_path / "fp.safetensors")
    writer = TeacherSignalCache("fp", [1, 1], path)
    _add(writer, ["a"])
    first = writer.flush()
    _add(writer, ["b"])
    writer.flush()
    real = signal_cache.file_format._FilePart

    def racing_part(file, fingerprint):
        if file == first and os.path.exists(first):  # the writer's merge lands between listing and opening
            os.replace(first, first.replace("-000000", "-999999"))
            raise FileNotFoundError(file)
        return real(file, fingerprint)

    monkeypatch.setattr(signal_cache.shards, "_FilePart", racing_part)
    assert sorted(TeacherSignalCache.load(path, "fp", [1, 1]).index) == ["a", "b"]
