"""The store: :class:`TeacherSignalCache`, per-example signals keyed by example id (see the package notes)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..strategies import TeacherSignals
from .file_format import (
    _NUMPY,
    _TORCH,
    COUNTS,
    SUFFIX,
    StaleSignalCacheError,
    _directory_lock,
    _dtype_code,
    _FilePart,
    _MemoryPart,
    _entries,
    _merge,
    _offsets,
    _write_file,
)
from .fingerprint import text_hash
from .legacy import _legacy_path
from .shards import SHARD_MERGE_FANOUT, _read_parts, _shard_names

FLUSH_ROWS = 4096  # rows computed between two shard writes (at most this much work is lost on a kill)
FLUSH_SECONDS = 120.0  # ... or this much time


class TeacherSignalCache:
    """Per-example signals: deterministic logits (all teachers, concatenated), deterministic and MC
    certainty, MC mutual information and top-class variance, each teacher's pooled features (fp16,
    ``features_<t>``, when a router needs them), and any other named per-row tensor. :meth:`lookup` gathers
    a batch by example id onto the cache's device.

    Persistence: ``path`` is the main file; rows computed since the last write go to shard files in
    ``<path>.shards/`` (see :meth:`flush`); :meth:`load` merges both, :meth:`save` compacts them. Files are
    memory-mapped (see :mod:`.file_format`): only the ids and text hashes are held in memory (about 100
    bytes a row), the signal rows stay on disk until a lookup reads them, so a pool larger than RAM works.

    Rows may be ragged (a ``COUNTS`` tensor: each row's number of entries; see :mod:`.file_format`), as in
    MergeDistill's top-k cache, which is this store with its own ``add`` / ``lookup``.
    """

    # How a file of an older format of this cache kind is read (migrated when met; see legacy._migrate_legacy).
    legacy_reader = None

    def __init__(self, fingerprint: str, label_sizes: Sequence[int], path: Optional[str] = None) -> None:
        self.fingerprint = fingerprint
        self.label_sizes = list(label_sizes)
        self.path = path
        self.index: dict[str, int] = {}
        self.text_hashes: list[int] = []
        self.device = torch.device("cpu")
        self._parts: list = []  # _FilePart / _MemoryPart, each holding a contiguous range of global rows
        self._starts: list[int] = []  # the first global row of each part
        self._local: list[np.ndarray] = []  # the part's own row of each of its global rows
        self._pending: list[dict[str, torch.Tensor]] = []  # row blocks added since the last flush
        self._pending_start = 0  # index of the first unflushed row
        self._pending_part: Optional[_MemoryPart] = None  # the pending rows, gathered for lookups
        self._last_flush = time.monotonic()
        self._writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._shard_count = 0
        self._own: list[tuple[str, int]] = []  # (path, merge level) of this writer's shards: the last parts

    # ------------------------------------------------------------------ building
    def missing(self, ids: Iterable[str], texts: Iterable[str]) -> list[int]:
        """Positions of rows not cached yet; raises if a cached id's text changed."""
        positions = []
        for position, (example_id, text) in enumerate(zip(ids, texts)):
            row = self.index.get(example_id)
            if row is None:
                positions.append(position)
            elif self.text_hashes[row] != text_hash(text):
                raise StaleSignalCacheError(
                    f"Example id {example_id!r} is cached with a different text (cache {self.path or 'in memory'}). "
                    "Ids must identify texts; delete the cache or fix the ids."
                )
        return positions

    def add(self, ids: Sequence[str], texts: Sequence[str], signals: TeacherSignals, deterministic: torch.Tensor) -> None:
        rows = {
            "logits": torch.cat(signals.logits, dim=1).float().cpu(),
            "deterministic": deterministic.float().cpu(),
        }
        if signals.certainty is not None:  # MC certainty (absent from caches of runs that read no MC statistics)
            rows["mc"] = signals.certainty.float().cpu()
        if signals.mutual_information is not None:
            rows["mutual_information"] = signals.mutual_information.float().cpu()
            rows["top_variance"] = signals.top_variance.float().cpu()
        for t, features in enumerate(signals.features or []):
            rows[f"features_{t}"] = features.detach().half().cpu()
        self.add_rows(ids, [text_hash(text) for text in texts], rows)

    def add_rows(self, ids: Sequence[str], text_hashes: Sequence[int], rows: dict[str, torch.Tensor]) -> None:
        """Append rows: one entry per id in every named tensor (the generic form of :meth:`add`). Ragged rows: a
        ``COUNTS`` tensor (int64, one per id) and ``sum(counts)`` entries, row after row, in every other tensor."""
        counts = rows.get(COUNTS)
        if counts is not None and (counts.dtype != torch.int64 or counts.dim() != 1 or bool((counts < 0).any())):
            raise ValueError(f"{COUNTS} must be a 1-D int64 tensor of entry counts >= 0, one per id.")
        for name, tensor in rows.items():
            expected, what = (len(ids), "rows") if counts is None or name == COUNTS else (int(counts.sum()), "entries")
            if tensor.shape[0] != expected:
                raise ValueError(f"Tensor {name!r} has {tensor.shape[0]} {what} for {expected} "
                                 f"{'ids' if what == 'rows' else 'announced by the counts'}.")
            _dtype_code(name, tensor.dtype, "added rows")
        names = self._names()
        if names is not None and sorted(rows) != names:
            raise ValueError(f"Rows with tensors {sorted(rows)} cannot join a cache holding {names}.")
        for example_id in ids:
            if example_id in self.index:
                raise ValueError(f"Example id {example_id!r} appears twice; ids must be unique.")
            self.index[example_id] = len(self.index)
        self.text_hashes.extend(int(h) for h in text_hashes)
        self._pending.append({name: tensor.detach().cpu() for name, tensor in rows.items()})
        self._pending_part = None

    def _names(self) -> Optional[list[str]]:
        if self._parts:
            return sorted(self._parts[0].specs)
        return sorted(self._pending[0]) if self._pending else None

    def maybe_flush(self) -> None:
        """:meth:`flush` when ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS`` have passed since the last one."""
        pending = len(self.index) - self._pending_start
        if pending and (pending >= FLUSH_ROWS or time.monotonic() - self._last_flush >= FLUSH_SECONDS):
            self.flush()

    def _pending_rows(self) -> Optional[_MemoryPart]:
        if not self._pending:
            return None
        if self._pending_part is None:
            names = sorted(self._pending[0])
            self._pending_part = _MemoryPart(
                list(self.index)[self._pending_start :],
                {name: torch.cat([block[name] for block in self._pending]) for name in names},
            )
        return self._pending_part

    def flush(self) -> Optional[str]:
        """Write the rows added since the last flush as one new shard file; returns the path of the shard holding
        them (every ``SHARD_MERGE_FANOUT`` shards of one size, this writer's newest are merged into one). The rows
        then leave memory: they are read back from the (memory-mapped) shard."""
        self._last_flush = time.monotonic()
        if self.path is None or not self._pending:
            return None
        part = self._pending_rows()
        directory = self.path + ".shards"
        os.makedirs(directory, exist_ok=True)
        shard = os.path.join(directory, f"{self._writer}-{self._shard_count:06d}{SUFFIX}")
        rows = np.arange(len(part.ids), dtype=np.int64)
        _write_file(shard, self.fingerprint, self.label_sizes, part.ids, self.text_hashes[self._pending_start :],
                    part.specs, [(part, rows)])
        self._shard_count += 1
        self._append_part(_FilePart(shard, self.fingerprint), rows, self._pending_start)
        self._own.append((shard, 0))
        self._pending, self._pending_part = [], None
        self._pending_start = len(self.index)
        while len(self._own) >= SHARD_MERGE_FANOUT and len({lvl for _, lvl in self._own[-SHARD_MERGE_FANOUT:]}) == 1:
            shard = self._merge_own_shards(SHARD_MERGE_FANOUT)
        return shard

    def _merge_own_shards(self, count: int) -> str:
        """Replace this writer's newest ``count`` shards (the last parts, one merge level) by one shard of the next
        level holding their rows: the new shard is written (atomically) before the old ones are deleted, so every
        row is always in some file, and the files this writer holds open stay bounded."""
        k = len(self._parts) - count
        start, level = self._starts[k], self._own[-count][1] + 1
        ids = list(self.index)[start : self._pending_start]
        directory = self.path + ".shards"
        os.makedirs(directory, exist_ok=True)  # another process's save() removes it when it is empty
        shard = os.path.join(directory, f"{self._writer}-{self._shard_count:06d}{SUFFIX}")
        _write_file(shard, self.fingerprint, self.label_sizes, ids, self.text_hashes[start : self._pending_start],
                    self._parts[k].specs, list(zip(self._parts[k:], self._local[k:])))
        self._shard_count += 1
        merged, old = _FilePart(shard, self.fingerprint), self._parts[k:]
        old_files = [path for path, _ in self._own[-count:]]
        del self._parts[k:], self._starts[k:], self._local[k:], self._own[-count:]
        self._append_part(merged, np.arange(len(ids), dtype=np.int64), start)
        self._own.append((shard, level))
        for path in old_files:
            with contextlib.suppress(FileNotFoundError):  # already compacted by another process's save()
                os.remove(path)
        for part in old:
            part.close()
        return shard

    def _append_part(self, part, rows: np.ndarray, start: int) -> None:
        self._parts.append(part)
        self._starts.append(start)
        self._local.append(np.asarray(rows, dtype=np.int64))

    def finalize(self, device: torch.device) -> "TeacherSignalCache":
        """Lookups return tensors on ``device``."""
        self.device = torch.device(device)
        return self

    # ------------------------------------------------------------------ use
    def _gather(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Rows ``rows`` (global numbers) of tensor ``name``, read from the parts that hold them (of a ragged tensor:
        their entries, one row after the other)."""
        parts, starts, local = list(self._parts), list(self._starts), list(self._local)
        pending = self._pending_rows()
        if pending is not None:
            parts.append(pending)
            starts.append(self._pending_start)
            local.append(np.arange(len(pending.ids), dtype=np.int64))
        if not parts:
            raise StaleSignalCacheError(f"The signal cache {self.path or 'in memory'} holds no rows.")
        owner = np.searchsorted(np.asarray(starts, dtype=np.int64), rows, side="right") - 1
        code, trailing = parts[0].specs[name]
        offsets = None  # ragged: where each requested row's entries go
        if name != COUNTS and COUNTS in parts[0].specs:
            counts = torch.empty(len(rows), dtype=torch.int64)
            for k in np.unique(owner).tolist():
                where = np.nonzero(owner == k)[0]
                counts[torch.from_numpy(where)] = parts[k].read(COUNTS, local[k][rows[where] - starts[k]])
            offsets = _offsets(counts.numpy())
        out = torch.empty((len(rows) if offsets is None else int(offsets[-1]), *trailing), dtype=_TORCH[code])
        for k in np.unique(owner).tolist():
            where = np.nonzero(owner == k)[0]
            target = where if offsets is None else _entries(offsets, where)
            out[torch.from_numpy(target)] = parts[k].read(name, local[k][rows[where] - starts[k]])
        return out.to(self.device, non_blocking=True)

    def row_numbers(self, ids: Sequence[str]) -> np.ndarray:
        """The rows of ``ids``; an id without cached signals is a :class:`StaleSignalCacheError` naming it."""
        try:
            return np.asarray([self.index[example_id] for example_id in ids], dtype=np.int64)
        except KeyError as err:
            raise StaleSignalCacheError(
                f"Example id {err.args[0]!r} has no cached teacher signals; precompute them for this dataset."
            ) from None

    def read(self, name: str, ids: Sequence[str]) -> torch.Tensor:
        """Tensor ``name`` of the rows of ``ids``, in that order (ragged: their entries, one row after the other)."""
        return self._gather(name, self.row_numbers(ids))

    def lookup(self, ids: Sequence[str], certainty_source: Optional[str]) -> TeacherSignals:
        rows = self.row_numbers(ids)
        names = self._names() or []
        batch_logits = list(self._gather("logits", rows).split(self.label_sizes, dim=1))
        certainty = None
        if certainty_source is not None:
            if certainty_source not in names:
                raise ValueError(
                    f"This signal cache holds no {certainty_source!r} certainty (it holds {names}): it was computed for "
                    "a run that reads no MC statistics. Precompute with mc=True."
                )
            certainty = self._gather(certainty_source, rows)
        extra: dict = {}
        for name in ("mutual_information", "top_variance"):
            if name in names:
                extra[name] = self._gather(name, rows)
        if "features_0" in names:
            extra["features"] = [self._gather(f"features_{t}", rows).float() for t in range(len(self.label_sizes))]
        return TeacherSignals(logits=batch_logits, certainty=certainty, **extra)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every row of every tensor, read into memory on the cache's device (inspection and small caches;
        training reads rows through :meth:`lookup`)."""
        rows = np.arange(len(self.index), dtype=np.int64)
        return {name: self._gather(name, rows) for name in self._names() or []}

    def nbytes(self) -> int:
        """Bytes of signal rows (on disk or in memory), ids excluded."""
        total = 0
        names = self._names() or []
        entries = len(self.index)
        if COUNTS in names:
            entries = int(self._gather(COUNTS, np.arange(len(self.index), dtype=np.int64)).sum())
        for name in names:
            code, trailing = (self._parts[0] if self._parts else self._pending_rows()).specs[name]
            rows = len(self.index) if name == COUNTS else entries
            total += rows * int(np.prod(trailing)) * np.dtype(_NUMPY[code]).itemsize
        return total

    def __len__(self) -> int:
        return len(self.index)

    # ------------------------------------------------------------------ persistence
    def _segments(self) -> list:
        """``(part, rows)`` of every row, in global order."""
        segments = list(zip(self._parts, self._local))
        pending = self._pending_rows()
        if pending is not None:
            segments.append((pending, np.arange(len(pending.ids), dtype=np.int64)))
        return segments

    def save(self, path: Optional[str] = None) -> str:
        """Compact: merge the rows of this cache, the main file and every shard (also other writers') into the
        main file, streaming, then delete the merged shards and read the new main file (memory-mapped).
        Serialised by a lock on the directory."""
        path = path or self.path
        if path is None:
            raise ValueError("No path to save the signal cache to.")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with _directory_lock(directory):
            # locked=True: this process holds the lock (a second flock here would wait for itself)
            parts, shards = _read_parts(path, self.fingerprint, self.label_sizes, locked=True,
                                        legacy_reader=self.legacy_reader)
            try:
                ids, hashes = list(self.index), list(self.text_hashes)
                sources = [("memory", ids, hashes, self._segments())]
                sources += [(part.source, part.ids, part.text_hashes,
                             [(part, np.arange(len(part.ids), dtype=np.int64))]) for part in parts]
                merged_ids, merged_hashes, specs, segments = _merge(sources, path)
                _write_file(path, self.fingerprint, self.label_sizes, merged_ids, merged_hashes, specs, segments)
                for shard in shards:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(shard)
                with contextlib.suppress(OSError):
                    os.rmdir(path + ".shards")  # only when empty
                main = _FilePart(path, self.fingerprint)
            finally:
                for part in parts:
                    part.close()
        old = self._parts
        self.path = path
        self._adopt([main])
        for part in old:
            part.close()
        return path

    def _adopt(self, parts: list) -> None:
        """Become the union of ``parts`` (rows by id; the first occurrence of an id wins)."""
        sources = [(p.source, p.ids, p.text_hashes, [(p, np.arange(len(p.ids), dtype=np.int64))]) for p in parts]
        ids, hashes, _, segments = _merge(sources, self.path or "memory")
        self.index = {example_id: i for i, example_id in enumerate(ids)}
        self.text_hashes = list(hashes)
        self._parts, self._starts, self._local = [], [], []
        start = 0
        for part, rows in segments:
            self._append_part(part, rows, start)
            start += len(rows)
        self._pending, self._pending_part = [], None
        self._pending_start = len(self.index)
        self._own = []

    @classmethod
    def load(cls, path: str, fingerprint: str, label_sizes: Sequence[int]) -> "TeacherSignalCache":
        """The main file ``path`` merged with every shard in ``<path>.shards/`` (either may be missing), all
        memory-mapped."""
        parts, _ = _read_parts(path, fingerprint, label_sizes, legacy_reader=cls.legacy_reader)
        cache = cls(fingerprint, label_sizes, path)
        cache._adopt(parts)
        return cache

    @staticmethod
    def exists(path: str) -> bool:
        """Whether a main file or shards exist for ``path`` (or a format-2 main file, migrated when loaded)."""
        shards = path + ".shards"
        legacy = _legacy_path(path)
        return os.path.exists(path) or bool(_shard_names(shards)) or (legacy is not None and os.path.exists(legacy))
