"""Teacher signals computed once and reused: keyed by example id, guarded by a fingerprint.

Why: querying the teachers dominates the cost of knowledge integration (MUKI runs every teacher
K + 1 times per example). When fresh MC samples every epoch are not needed, the signals of each
training example can be computed once and reused across epochs, runs and strategies (one cache
holds the deterministic logits AND both certainty scores, so it serves every strategy).

What keeps it honest (the reference code's precomputed scores were indexed by row order, so any
shuffling silently misaligned them):
- rows are looked up by the dataset's example id, never by position;
- the cache file is named by a fingerprint of everything that determines the signals (teacher
  weights, label names, tokenizers and truncation lengths, MC samples, teacher dtype), so a cache
  of other teachers or settings is never picked up;
- each row stores a hash of its text: an id whose text changed is a stale cache and an error.

What keeps work from being lost (see docs/reliability.md):
- rows are written while they are computed, every ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS``, as
  immutable shard files ``<cache>.shards/<writer>-<n>.safetensors`` (written to a temporary name, then renamed):
  a bad row, a kill or a full disk near the end keeps every shard written so far; a writer merges its own
  shards as they accumulate (the new file first, then the old ones deleted), so open files stay bounded;
- loading merges the main file and every shard (rows by id), so several writers (processes sharing
  a cache directory, or one writer per rank of a sharded precompute) never overwrite each other;
  :meth:`save` compacts the shards into the main file under an exclusive lock on the directory;
- every file carries checksums of its rows; a garbage, cut or tampered file is one clear
  :class:`CorruptSignalCacheError` that names it (it holds only derived data and can be deleted).

What keeps memory flat: files are memory-mapped (safetensors layout, see "file format" below); only
the ids and text hashes are held in memory, a lookup reads just the rows it asks for, and compaction
streams rows block by block. A pool larger than RAM works.

The data model is a generic dict of named per-row tensors (any names, dtypes and trailing shapes):
``tensors[name][i]`` belongs to ``ids[i]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import socket
import time
import uuid
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .collator import tokenizer_fingerprint
from .dataset_checks import check_texts, column_names, column_values, is_streaming  # noqa: F401  (re-exported)
from .numerics import certainty_from_logits
from .strategies import TeacherSignals
from .teacher import Teacher

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 3  # 3: memory-mapped safetensors layout, per-block checksums (2: torch.save payloads)
SUFFIX = ".safetensors"  # cache files and shards
LEGACY_SUFFIX = ".pt"  # cache format 2 (torch.save payloads): migrated when met (see _migrate_legacy)
# The format part of the fingerprint, frozen at 2: since format 3 each file names its format in its header, so
# the same teachers and settings keep their fingerprint and a format-2 cache is migrated, not recomputed.
_FINGERPRINT_FORMAT = 2
BLOCK_ROWS = 4096  # rows per checksummed block of a cache file
VERIFY_EAGER_BYTES = 1 << 30  # files up to this size are fully checked when opened; larger ones block by block
# Bump when the way signals are computed from a teacher changes (querying.py / numerics.py): old caches
# then get another fingerprint and are never reused.
SIGNAL_COMPUTATION_VERSION = 2  # 2: MC mutual information and top-class variance, optional features
FLUSH_ROWS = 4096  # rows computed between two shard writes (at most this much work is lost on a kill)
FLUSH_SECONDS = 120.0  # ... or this much time
# Open files stay bounded (each memory-mapped file holds a descriptor): a writer merges its newest
# SHARD_MERGE_FANOUT shards of one size into one shard (sizes grow geometrically, so each row is rewritten only
# about log16(flushes) times), and reading never opens more than MAX_OPEN_SHARDS shards: beyond that they are
# first merged in batches of that many (under the directory lock).
SHARD_MERGE_FANOUT = 16
MAX_OPEN_SHARDS = 32
_CONFIG_KEYS_IGNORED = ("_name_or_path", "transformers_version", "_commit_hash")


class StaleSignalCacheError(RuntimeError):
    """A cached signal no longer matches the example or teachers it claims to describe."""


class CorruptSignalCacheError(RuntimeError):
    """A signal cache file cannot be read back as written (garbage, cut off, tampered)."""


def _corrupt(path: str, what: str) -> CorruptSignalCacheError:
    return CorruptSignalCacheError(
        f"Signal cache file {path} is corrupt ({what}). It holds only cached teacher signals: delete it and "
        "they are recomputed."
    )


def _hash_tensor(update: Callable[[bytes], None], tensor: torch.Tensor) -> None:
    data = tensor.detach().to("cpu").contiguous()
    update(str((tuple(data.shape), str(data.dtype))).encode())
    update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def model_config_fingerprint(model: torch.nn.Module) -> str:
    """The teacher's configuration and module structure (dropout probabilities, activation, attention
    implementation ...): anything that changes its MC draws without changing its weights."""
    config = getattr(model, "config", None)
    values = config.to_dict() if hasattr(config, "to_dict") else {}
    values = {k: v for k, v in values.items() if k not in _CONFIG_KEYS_IGNORED}
    attention = getattr(config, "_attn_implementation", None)
    return json.dumps([values, attention, repr(model)], sort_keys=True, default=str)


def teachers_fingerprint(
    teachers: Sequence[Teacher],
    student_tokenizer,
    max_lengths: Sequence[Optional[int]],
    mc_samples: int,
    dtype: torch.dtype,
    mc_top_layers: Optional[int] = None,
    features: bool = False,
) -> str:
    """A short hash of everything that determines the teachers' signals for a given text.

    ``mc_samples=0`` names a cache without Monte-Carlo statistics (one deterministic pass per teacher)."""
    return teachers_fingerprints(teachers, student_tokenizer, max_lengths, dtype, [(mc_samples, mc_top_layers, features)])[0]


def teachers_fingerprints(
    teachers: Sequence[Teacher],
    student_tokenizer,
    max_lengths: Sequence[Optional[int]],
    dtype: torch.dtype,
    variants: Sequence[tuple[int, Optional[int], bool]],
) -> list[str]:
    """:func:`teachers_fingerprint` of several cache kinds ``(mc_samples, mc_top_layers, features)`` at once: every
    teacher weight is copied to the host and serialised once, whatever the number of kinds."""
    hashers = []
    for mc_samples, mc_top_layers, features in variants:
        settings = (
            f"ki-signals-v{_FINGERPRINT_FORMAT}.{SIGNAL_COMPUTATION_VERSION}|K={mc_samples}|top={mc_top_layers}|{dtype}"
        )
        if features:
            settings += "|features"  # caches that also hold every teacher's pooled features (feature routers)
        hashers.append(hashlib.sha256(settings.encode()))

    def update(data: bytes) -> None:
        for hasher in hashers:
            hasher.update(data)

    for teacher, length in zip(teachers, max_lengths):
        tokenizer = teacher.tokenizer or student_tokenizer
        tokenization = tokenizer_fingerprint(tokenizer) if tokenizer is not None else "custom-collator"
        adapter = getattr(teacher, "adapter", None)  # adapter teachers share one model: name the adapter
        update(json.dumps([teacher.labels, length, tokenization] + ([adapter] if adapter else [])).encode())
        update(model_config_fingerprint(teacher.model).encode())
        for name, tensor in sorted(teacher.model.state_dict().items()):
            update(name.encode())
            _hash_tensor(update, tensor)
    return [hasher.hexdigest()[:20] for hasher in hashers]


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


@contextlib.contextmanager
def _directory_lock(directory: str) -> Iterator[None]:
    """Exclusive lock on ``directory`` (POSIX ``flock``; no lock where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: compaction is then not serialised between processes
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---------------------------------------------------------------------------------------------- file format
# A cache file is in the safetensors layout (``safetensors.safe_open`` reads it): 8 bytes of header length, a
# JSON header (tensor dtypes, shapes and byte ranges; our metadata under "__metadata__"), then the raw
# row-major bytes of each tensor. ``__ids__`` holds the example ids (JSON, UTF-8), ``__text_hashes__`` one
# int64 per row, every other tensor one entry per row. Files are memory-mapped: opening one reads the header,
# the ids and the text hashes; a lookup reads only the rows it asks for. Checksums: the ids and text hashes
# are checked when a file is opened; the signal rows carry one SHA-256 per block of ``BLOCK_ROWS`` rows,
# verified for the whole file when it is opened if it is at most ``VERIFY_EAGER_BYTES`` long, otherwise the
# first time a row of the block is read (a pool larger than RAM is never read whole just to open it).
_FORMAT_NAME = "ki-trainer-signal-cache"
_IDS, _HASHES = "__ids__", "__text_hashes__"
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_TORCH = {code: dtype for dtype, code in _DTYPES.items()}
# numpy has no bfloat16: its rows are stored and mapped as int16 and viewed back as bfloat16 by torch
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _to_torch(array: np.ndarray, code: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if code == "BF16" else tensor


def _block_digest(pieces: Sequence[bytes]) -> str:
    return hashlib.sha256(b"".join(pieces)).hexdigest()


class _MemoryPart:
    """Rows held in memory (computed by this process and not written yet)."""

    def __init__(self, ids: Sequence[str], tensors: dict[str, torch.Tensor], source: str = "memory") -> None:
        self.source = source
        self.ids = list(ids)
        self.tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        self.specs = {name: (_dtype_code(name, t.dtype, self.source), list(t.shape[1:])) for name, t in self.tensors.items()}

    def read(self, name: str, rows: np.ndarray) -> torch.Tensor:
        return self.tensors[name].index_select(0, torch.from_numpy(np.asarray(rows, dtype=np.int64)))

    def close(self) -> None:
        pass


def _dtype_code(name: str, dtype: torch.dtype, where: str) -> str:
    if dtype not in _DTYPES:
        raise ValueError(f"Tensor {name!r} ({where}) has dtype {dtype}, which signal cache files cannot hold.")
    return _DTYPES[dtype]


class _FilePart:
    """One cache file, memory-mapped and checked (see the format notes above)."""

    def __init__(self, path: str, fingerprint: str) -> None:
        self.source = path
        self._map: Optional[mmap.mmap] = None
        # The file is opened once: its size, header and rows all come from that one descriptor, so a concurrent
        # compaction replacing `path` (os.replace) is never half seen. FileNotFoundError passes through (a shard
        # compacted meanwhile).
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise _corrupt(path, "empty, 0 bytes")
            self._map = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ)  # keeps its own descriptor
        head = self._map[:8]
        if head[:2] == b"PK":  # a zip archive: torch.save, the format before version 3
            raise StaleSignalCacheError(
                f"Signal cache {path} was written by an older ki-trainer (torch.save, cache format 2; this one "
                f"reads format {CACHE_FORMAT_VERSION}). Delete it: the signals are recomputed."
            )
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than a header")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise _corrupt(path, f"header of {length} bytes in a {size}-byte file (cut off or not a cache file)")
        try:
            header = json.loads(self._map[8 : 8 + length].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(path, "unreadable header") from None
        meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
            raise _corrupt(path, "not a signal cache file")
        if meta.get("version") != str(CACHE_FORMAT_VERSION) or meta.get("fingerprint") != fingerprint:
            raise StaleSignalCacheError(
                f"Signal cache {path} was computed for other teachers or settings "
                f"(fingerprint {meta.get('fingerprint')!r}, format {meta.get('version')!r}; expected {fingerprint!r}, "
                f"format {CACHE_FORMAT_VERSION}). Delete it or point signal_cache_dir elsewhere."
            )
        try:
            rows = int(meta["rows"])
            self.block_rows = int(meta["block_rows"])
            self.blocks = json.loads(meta["blocks"])
            entries = {name: (e["dtype"], [int(x) for x in e["shape"]], [int(x) for x in e["data_offsets"]])
                       for name, e in header.items()}
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, "incomplete header") from None
        start = 8 + length
        end = max((e[2][1] for e in entries.values()), default=0)
        if start + end != size:
            raise _corrupt(path, f"{size} bytes where the header describes {start + end} (cut off or appended to)")
        if _IDS not in entries or _HASHES not in entries or self.block_rows < 1:
            raise _corrupt(path, "ids or text hashes missing")
        if len(self.blocks) != -(-rows // self.block_rows):
            raise _corrupt(path, f"{len(self.blocks)} block checksums for {rows} rows")
        self.arrays: dict[str, np.ndarray] = {}
        self.specs: dict[str, tuple[str, list[int]]] = {}
        for name, (code, shape, (begin, stop)) in entries.items():
            if code not in _NUMPY or begin < 0 or stop < begin:
                raise _corrupt(path, f"tensor {name!r}: unknown dtype {code!r} or bad byte range")
            itemsize = np.dtype(_NUMPY[code]).itemsize
            count = int(np.prod(shape)) if shape else 1
            if count * itemsize != stop - begin:
                raise _corrupt(path, f"tensor {name!r} has {stop - begin} bytes for shape {shape}")
            if name != _IDS and (not shape or shape[0] != rows):
                raise _corrupt(path, f"tensor {name!r} has {shape[0] if shape else 0} rows for {rows} ids")
            buffer = np.frombuffer(self._map, dtype=_NUMPY[code], count=count, offset=start + begin) if count else \
                np.empty(0, dtype=_NUMPY[code])
            self.arrays[name] = buffer.reshape(shape)
            if name not in (_IDS, _HASHES):
                self.specs[name] = (code, shape[1:])
        ids_bytes = self.arrays.pop(_IDS).tobytes()
        hashes = self.arrays.pop(_HASHES)
        if hashlib.sha256(ids_bytes + hashes.tobytes()).hexdigest() != meta.get("ids_sha256"):
            raise _corrupt(path, "checksum mismatch in the ids or text hashes")
        self.ids = json.loads(ids_bytes.decode("utf-8"))
        self.text_hashes = hashes.tolist()
        if len(self.ids) != rows:
            raise _corrupt(path, f"{len(self.ids)} ids for {rows} rows")
        self._verified = np.zeros(len(self.blocks), dtype=bool)
        if size <= VERIFY_EAGER_BYTES:
            self.verify()

    def verify(self, blocks: Optional[Iterable[int]] = None) -> None:
        """Check the rows' checksums (``blocks``: those block numbers only; default all), each block once."""
        for block in range(len(self.blocks)) if blocks is None else blocks:
            if self._verified[block]:
                continue
            lo, hi = block * self.block_rows, (block + 1) * self.block_rows
            pieces = [hashlib.sha256(self.arrays[name][lo:hi].tobytes()).digest() for name in sorted(self.arrays)]
            if _block_digest(pieces) != self.blocks[block]:
                raise _corrupt(self.source, f"checksum mismatch in rows {lo}..{min(hi, len(self.ids)) - 1}: the rows "
                                            "were changed after they were written")
            self._verified[block] = True

    def read(self, name: str, rows: np.ndarray) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows):
            self.verify(np.unique(rows // self.block_rows).tolist())
        return _to_torch(self.arrays[name][rows], self.specs[name][0])

    def close(self) -> None:
        """Release the memory map and the file descriptor it holds; the part cannot be read afterwards."""
        self.arrays = {}
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view of its rows still alive: released with it instead
                self._map.close()
                self._map = None


def _write_file(path: str, fingerprint: str, label_sizes: Sequence[int], ids: Sequence[str],
                text_hashes: Sequence[int], specs: dict[str, tuple[str, list[int]]], segments: list) -> None:
    """Write the rows of ``segments`` (``(part, rows)`` pairs, in order) as one cache file, streaming: at most
    ``BLOCK_ROWS`` rows are in memory at a time. Written to a temporary name, then renamed (atomic)."""
    n = len(ids)
    ids_bytes = json.dumps(list(ids)).encode("utf-8")
    hashes = np.asarray(list(text_hashes), dtype=np.int64).reshape(-1)
    names = sorted(specs)
    entries: dict[str, dict] = {}
    offset = 0
    # Widest dtypes first and the ids (bytes) last: every tensor starts aligned to its item size, so reads of
    # a few rows never copy a whole misaligned tensor.
    layout = [(_HASHES, "I64", [n])] + sorted(
        [(name, specs[name][0], [n] + list(specs[name][1])) for name in names],
        key=lambda entry: (-np.dtype(_NUMPY[entry[1]]).itemsize, entry[0]),
    ) + [(_IDS, "U8", [len(ids_bytes)])]
    for name, code, shape in layout:
        nbytes = int(np.prod(shape)) * np.dtype(_NUMPY[code]).itemsize
        entries[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    n_blocks = -(-n // BLOCK_ROWS)
    meta = {"format": _FORMAT_NAME, "version": str(CACHE_FORMAT_VERSION), "fingerprint": fingerprint,
            "label_sizes": json.dumps(list(label_sizes)), "rows": str(n), "block_rows": str(BLOCK_ROWS),
            "ids_sha256": hashlib.sha256(ids_bytes + hashes.tobytes()).hexdigest()}

    def header(blocks: list[str]) -> bytes:
        text = json.dumps({"__metadata__": {**meta, "blocks": json.dumps(blocks)}, **entries}).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        return len(text).to_bytes(8, "little") + text

    placeholder = header(["0" * 64] * n_blocks)  # same length as the final header: patched in place at the end
    digests: list[dict[str, bytes]] = [{} for _ in range(n_blocks)]
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as out:
            out.write(placeholder)
            out.write(hashes.tobytes())
            for name in [entry[0] for entry in layout[1:-1]]:
                row, hasher = 0, hashlib.sha256()
                for part, rows in segments:
                    for lo in range(0, len(rows), BLOCK_ROWS):
                        data = _to_numpy(part.read(name, rows[lo : lo + BLOCK_ROWS]))
                        i = 0
                        while i < len(data):
                            take = min(len(data) - i, (row // BLOCK_ROWS + 1) * BLOCK_ROWS - row)
                            piece = data[i : i + take].tobytes()
                            hasher.update(piece)
                            out.write(piece)
                            row, i = row + take, i + take
                            if row % BLOCK_ROWS == 0 or row == n:
                                digests[(row - 1) // BLOCK_ROWS][name] = hasher.digest()
                                hasher = hashlib.sha256()
                if row != n:
                    raise RuntimeError(f"Internal error: {row} rows of {name!r} written for {n} ids.")
            out.write(ids_bytes)
            final = header([_block_digest([d[name] for name in names]) for d in digests])
            assert len(final) == len(placeholder)
            out.seek(0)
            out.write(final)
        os.replace(tmp, path)  # atomic: an interrupted write never leaves a half file under `path`
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class TeacherSignalCache:
    """Per-example signals: deterministic logits (all teachers, concatenated), deterministic and MC
    certainty, MC mutual information and top-class variance, each teacher's pooled features (fp16,
    ``features_<t>``, when a router needs them), and any other named per-row tensor. :meth:`lookup` gathers
    a batch by example id onto the cache's device.

    Persistence: ``path`` is the main file; rows computed since the last write go to shard files in
    ``<path>.shards/`` (see :meth:`flush`); :meth:`load` merges both, :meth:`save` compacts them. Files are
    memory-mapped (see the format notes above): only the ids and text hashes are held in memory (about 100
    bytes a row), the signal rows stay on disk until a lookup reads them, so a pool larger than RAM works.
    """

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
        """Append rows: one entry per id in every named tensor (the generic form of :meth:`add`)."""
        for name, tensor in rows.items():
            if tensor.shape[0] != len(ids):
                raise ValueError(f"Tensor {name!r} has {tensor.shape[0]} rows for {len(ids)} ids.")
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
        """Rows ``rows`` (global numbers) of tensor ``name``, read from the parts that hold them."""
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
        out = torch.empty((len(rows), *trailing), dtype=_TORCH[code])
        for k in np.unique(owner).tolist():
            where = np.nonzero(owner == k)[0]
            out[torch.from_numpy(where)] = parts[k].read(name, local[k][rows[where] - starts[k]])
        return out.to(self.device, non_blocking=True)

    def lookup(self, ids: Sequence[str], certainty_source: Optional[str]) -> TeacherSignals:
        try:
            rows = np.asarray([self.index[example_id] for example_id in ids], dtype=np.int64)
        except KeyError as err:
            raise StaleSignalCacheError(
                f"Example id {err.args[0]!r} has no cached teacher signals; precompute them for this dataset."
            ) from None
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
        for name in self._names() or []:
            code, trailing = (self._parts[0] if self._parts else self._pending_rows()).specs[name]
            total += len(self.index) * int(np.prod(trailing)) * np.dtype(_NUMPY[code]).itemsize
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
            parts, shards = _read_parts(path, self.fingerprint, self.label_sizes, locked=True)
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
        parts, _ = _read_parts(path, fingerprint, label_sizes)
        cache = cls(fingerprint, label_sizes, path)
        cache._adopt(parts)
        return cache

    @staticmethod
    def exists(path: str) -> bool:
        """Whether a main file or shards exist for ``path`` (or a format-2 main file, migrated when loaded)."""
        shards = path + ".shards"
        legacy = _legacy_path(path)
        return os.path.exists(path) or bool(_shard_names(shards)) or (legacy is not None and os.path.exists(legacy))


def _legacy_path(path: str) -> Optional[str]:
    return path[: -len(SUFFIX)] + LEGACY_SUFFIX if path.endswith(SUFFIX) else None


def _read_legacy(path: str, fingerprint: str) -> _MemoryPart:
    """A format-2 file (a ``torch.save`` payload with one checksum over all rows), checked as that format was."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch's own message suggests weights_only=False: never pass that on
        raise _corrupt(path, f"unreadable: {type(err).__name__}") from None
    keys = ("version", "fingerprint", "ids", "text_hashes", "tensors")
    if not isinstance(payload, dict) or any(k not in payload for k in keys):
        raise _corrupt(path, "not a signal cache payload")
    if payload["version"] != 2 or payload["fingerprint"] != fingerprint:
        raise StaleSignalCacheError(
            f"Signal cache {path} was computed for other teachers or settings (fingerprint "
            f"{payload.get('fingerprint')!r}, format {payload.get('version')!r}; expected {fingerprint!r}, format 2). "
            "Delete it or point signal_cache_dir elsewhere."
        )
    ids, hashes, tensors = payload["ids"], payload["text_hashes"], payload["tensors"]
    if not isinstance(tensors, dict) or not all(torch.is_tensor(t) for t in tensors.values()):
        raise _corrupt(path, "tensors missing")
    if len(hashes) != len(ids) or any(t.dim() == 0 or t.shape[0] != len(ids) for t in tensors.values()):
        raise _corrupt(path, "tensors or text hashes of another length than the ids")
    hasher = hashlib.sha256(json.dumps([list(ids), list(hashes)]).encode())
    for name in sorted(tensors):
        hasher.update(name.encode())
        _hash_tensor(hasher.update, tensors[name])
    if payload.get("checksum") != hasher.hexdigest():
        raise _corrupt(path, "checksum mismatch: the rows were changed after they were written")
    part = _MemoryPart(ids, tensors, source=path)
    part.text_hashes = [int(h) for h in hashes]
    return part


def _legacy_pending(path: str) -> bool:
    """Whether ``path`` does not exist but a format-2 cache of it does (to migrate)."""
    legacy = _legacy_path(path)
    return legacy is not None and not os.path.exists(path) and (
        os.path.exists(legacy) or os.path.isdir(legacy + ".shards"))


def _migrate_legacy(path: str, fingerprint: str, label_sizes: Sequence[int]) -> bool:
    """Convert a format-2 cache (``<name>.pt`` and its ``<name>.pt.shards/*.pt``) into ``path`` (format 3) when
    ``path`` does not exist yet. The old files are checked as before and left in place (they may be deleted).
    Returns whether a conversion happened. The caller holds the directory lock (a concurrent save() of new rows
    into ``path`` must not be overwritten by a slower migration)."""
    legacy = _legacy_path(path)
    if legacy is None or os.path.exists(path):
        return False
    files = [legacy] if os.path.exists(legacy) else []
    directory = legacy + ".shards"
    if os.path.isdir(directory):
        files += [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.endswith(LEGACY_SUFFIX)]
    if not files:
        return False
    parts = [_read_legacy(file, fingerprint) for file in files]
    sources = [(p.source, p.ids, p.text_hashes, [(p, np.arange(len(p.ids), dtype=np.int64))]) for p in parts]
    ids, hashes, specs, segments = _merge(sources, legacy)
    _write_file(path, fingerprint, label_sizes, ids, hashes, specs, segments)
    logger.info(f"Signal cache {legacy} (format 2) migrated to {path}; the old file(s) can be deleted.")
    return True


def _shard_names(directory: str) -> list[str]:
    """The shard files in ``directory`` (sorted), none when it does not exist."""
    try:
        return sorted(n for n in os.listdir(directory) if n.endswith(SUFFIX))
    except (FileNotFoundError, NotADirectoryError):  # e.g. removed (empty) by another process's save() just now
        return []


def _consolidate_shards(path: str, fingerprint: str, label_sizes: Sequence[int]) -> None:
    """Merge the shards of ``path`` in batches of ``MAX_OPEN_SHARDS`` (each batch written as one new shard, then
    its shards deleted) until at most ``MAX_OPEN_SHARDS`` remain, so reading them never holds more files open.
    The caller holds the directory lock."""
    directory = path + ".shards"
    tag = f"merged-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    count = 0
    while len(names := _shard_names(directory)) > MAX_OPEN_SHARDS:
        parts, files = [], []
        try:
            for name in names[:MAX_OPEN_SHARDS]:
                try:
                    parts.append(_FilePart(os.path.join(directory, name), fingerprint))
                except FileNotFoundError:  # merged by its (live) writer meanwhile: its rows are in a newer shard
                    continue
                files.append(parts[-1].source)
            sources = [(p.source, p.ids, p.text_hashes, [(p, np.arange(len(p.ids), dtype=np.int64))]) for p in parts]
            ids, hashes, specs, segments = _merge(sources, directory)
            if ids:
                out = os.path.join(directory, f"{tag}-{count:06d}{SUFFIX}")
                _write_file(out, fingerprint, label_sizes, ids, hashes, specs, segments)
                count += 1
        finally:
            for part in parts:
                part.close()
        for file in files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(file)


def _read_parts(path: str, fingerprint: str, label_sizes: Sequence[int] = (),
                locked: bool = False) -> tuple[list[_FilePart], list[str]]:
    """The main file and the shards (opened and checked), plus the shard paths that were read. A format-2 cache
    of the same fingerprint is migrated first, and more than ``MAX_OPEN_SHARDS`` shards are first merged in
    batches; both change files, so both run under the directory lock: taken here unless ``locked`` says the
    caller holds it (save(); a second flock in the same process would wait for itself)."""
    directory = path + ".shards"
    if _legacy_pending(path) or len(_shard_names(directory)) > MAX_OPEN_SHARDS:
        lock = contextlib.nullcontext() if locked else _directory_lock(os.path.dirname(os.path.abspath(path)))
        with lock:  # checked again inside: another process may have done it while this one waited
            _migrate_legacy(path, fingerprint, label_sizes)
            _consolidate_shards(path, fingerprint, label_sizes)
    attempts = 3
    while True:
        parts, shards, vanished = [], [], False
        if os.path.exists(path):
            parts.append(_FilePart(path, fingerprint))
        for name in _shard_names(directory):
            shard = os.path.join(directory, name)
            try:
                parts.append(_FilePart(shard, fingerprint))
            except FileNotFoundError:  # merged into the main file or a newer shard in the meantime
                vanished = True
                continue
            shards.append(shard)
        attempts -= 1
        if not vanished or not attempts:
            return parts, shards
        for part in parts:  # read again: the file now holding the vanished shard's rows is listed by then
            part.close()


def _merge(sources: list, where: str) -> tuple[list[str], list[int], dict, list]:
    """Union of rows by id (first occurrence wins; the same id with another text is a stale cache).

    ``sources``: ``(name, ids, text_hashes, segments)`` with ``segments`` the ``(part, rows)`` holding those
    ids in order. Returns the merged ids, hashes, tensor specs and the ``(part, rows)`` segments to read."""
    ids: list[str] = []
    hashes: list[int] = []
    seen: dict[str, int] = {}
    specs = None
    segments = []
    for source, source_ids, source_hashes, parts in sources:
        position = 0
        for part, rows in parts:
            if not len(rows):
                continue
            if specs is None:
                specs = dict(part.specs)
            elif part.specs != specs:
                raise _corrupt(part.source, f"tensors {part.specs} differ from the other files' {specs}")
            keep = []
            for i in range(len(rows)):
                example_id, h = source_ids[position + i], source_hashes[position + i]
                known = seen.get(example_id)
                if known is None:
                    seen[example_id] = len(ids)
                    ids.append(example_id)
                    hashes.append(h)
                    keep.append(i)
                elif hashes[known] != h:
                    raise StaleSignalCacheError(
                        f"Example id {example_id!r} is cached with two different texts ({where}). Ids must identify "
                        "texts; delete the cache or fix the ids."
                    )
            position += len(rows)
            if keep:
                segments.append((part, rows if len(keep) == len(rows) else rows[np.asarray(keep, dtype=np.int64)]))
    return ids, hashes, specs or {}, segments


def shard_positions(positions: Sequence[int], rank: int, world_size: int, chunk_size: int) -> list[int]:
    """This rank's share of ``positions``: consecutive chunks of ``chunk_size`` dealt round-robin
    (chunk ``c`` goes to rank ``c % world_size``), in their original order.

    Every chunk keeps the rows it would have in a single process, so each rank re-chunks its share into
    exactly the batches one process would compute (same padding, same per-batch MC seed, same numbers).
    """
    if world_size <= 1:
        return list(positions)
    return [p for k, p in enumerate(positions) if (k // chunk_size) % world_size == rank]


def batch_seed(seed: int, ids: Sequence[str]) -> int:
    """The MC-dropout seed of one precompute batch: a hash of the run seed and the batch's example ids,
    so the draws depend on the rows, never on which process computed them or on what ran before."""
    digest = hashlib.blake2b(json.dumps([int(seed), [str(i) for i in ids]]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def build_or_update_cache(
    cache: TeacherSignalCache,
    dataset,
    id_column: str,
    text_column: str,
    batches: Callable[[list[int]], Iterable[tuple[list[int], TeacherSignals]]],
    shard: tuple[int, int, int] = (0, 1, 1),
) -> int:
    """Compute signals for the dataset rows the cache lacks; returns how many were missing (over all
    ranks).

    ``batches(positions)`` yields ``(positions, signals)`` for the requested dataset positions
    (signals carrying MC certainty when the run reads it). Rows are flushed to shard files as they are computed; on an
    error the rows computed so far are flushed before it propagates. ``shard=(rank, world_size,
    chunk_size)`` computes only this rank's share of the missing rows (see :func:`shard_positions`).
    """
    columns = column_names(dataset)
    if id_column not in columns:
        raise ValueError(
            f"Cached teacher signals need an example id column {id_column!r}; the dataset has "
            f"{columns}. Add one (e.g. dataset.map(lambda r, i: {{'id': str(i)}}, with_indices=True)) "
            "or set id_column=."
        )
    ids = [str(x) for x in column_values(dataset, id_column)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"Column {id_column!r} has duplicate ids; cached signals need unique ids.")
    texts = column_values(dataset, text_column)
    check_texts(texts, ids, "dataset", text_column)
    todo = cache.missing(ids, texts)
    rank, world_size, chunk_size = shard
    try:
        for positions, signals in batches(shard_positions(todo, rank, world_size, chunk_size)):
            deterministic = torch.stack([certainty_from_logits(logits) for logits in signals.logits], dim=1)
            cache.add([ids[p] for p in positions], [texts[p] for p in positions], signals, deterministic)
            cache.maybe_flush()
    except BaseException:
        with contextlib.suppress(Exception):
            cache.flush()  # keep what was computed; the original error is what the user must see
        raise
    return len(todo)


def build_or_update_cache_streaming(
    cache: TeacherSignalCache,
    rows: Iterable[dict],
    id_column: str,
    text_column: str,
    compute: Callable[[list[dict]], TeacherSignals],
    batch_size: int,
    shard: tuple[int, int] = (0, 1),
) -> tuple[int, list[str]]:
    """:func:`build_or_update_cache` for a dataset that can only be iterated (``IterableDataset``, streaming):
    one pass over ``rows``, holding one batch at a time. Returns how many rows were missing (over all ranks)
    and every row's id in order.

    The missing rows are grouped into batches of ``batch_size`` in the order they come, exactly as the
    map-style path groups them, and ``compute(batch_rows)`` gives their signals; ``shard=(rank, world_size)``
    computes only every ``world_size``-th batch. Each rank reads the whole stream (cheap next to the teachers).
    """
    rank, world_size = shard
    ids: list[str] = []
    seen: set[str] = set()
    batch: list[dict] = []
    missing = batches = 0

    def finish(batch: list[dict]) -> None:
        nonlocal missing, batches
        if batches % world_size == rank:
            signals = compute(batch)
            deterministic = torch.stack([certainty_from_logits(logits) for logits in signals.logits], dim=1)
            cache.add([str(r[id_column]) for r in batch], [r[text_column] for r in batch], signals, deterministic)
            cache.maybe_flush()
        missing += len(batch)
        batches += 1

    try:
        for position, row in enumerate(rows):
            if id_column not in row:
                raise ValueError(
                    f"Cached teacher signals need an example id column {id_column!r}; the streamed rows have "
                    f"{sorted(row)}. Add one (e.g. dataset.map(lambda r, i: {{'id': str(i)}}, with_indices=True)) or "
                    "set id_column=, or use teacher_signals='on_the_fly'."
                )
            example_id, text = str(row[id_column]), row.get(text_column)
            try:
                check_texts([text], [example_id], "The streamed dataset", text_column)
            except ValueError as err:  # name the row's position in the stream, not in the one-row check
                raise ValueError(str(err).replace("at row 0 ", f"at row {position} ", 1)) from None
            if example_id in seen:
                raise ValueError(f"Column {id_column!r} has duplicate ids ({example_id!r} at row {position}); cached "
                                 "signals need unique ids.")
            seen.add(example_id)
            ids.append(example_id)
            if cache.missing([example_id], [text]):
                batch.append(row)
                if len(batch) == batch_size:
                    finish(batch)
                    batch = []
        if batch:
            finish(batch)
    except BaseException:
        with contextlib.suppress(Exception):
            cache.flush()  # keep what was computed; the original error is what the user must see
        raise
    return missing, ids
