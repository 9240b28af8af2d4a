"""The cache file format: one file of named per-row tensors in the safetensors layout, with checksums.

A file is memory-mapped when opened (:class:`_FilePart`); only the ids and text hashes are read then, a lookup
reads the rows it asks for. Rows are fixed-size (one entry per row in every tensor) or ragged (a ``__counts__``
tensor gives each row's number of entries; every other tensor holds the rows' entries one after the other, e.g.
MergeDistill's top-k signals of each masked position of texts of any length). :func:`_write_file` writes rows streaming, block by block, to a temporary name and
renames it (atomic); :func:`_merge` unions the rows of several files by id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import uuid
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

CACHE_FORMAT_VERSION = 3  # 3: memory-mapped safetensors layout, per-block checksums (2: torch.save payloads)
SUFFIX = ".safetensors"  # cache files and shards
BLOCK_ROWS = 4096  # rows per checksummed block of a cache file
VERIFY_EAGER_BYTES = 1 << 30  # files up to this size are fully checked when opened; larger ones block by block


class StaleSignalCacheError(RuntimeError):
    """A cached signal no longer matches the example or teachers it claims to describe."""


class CorruptSignalCacheError(RuntimeError):
    """A signal cache file cannot be read back as written (garbage, cut off, tampered)."""


def _corrupt(path: str, what: str) -> CorruptSignalCacheError:
    return CorruptSignalCacheError(
        f"Signal cache file {path} is corrupt ({what}). It holds only cached teacher signals: delete it and "
        "they are recomputed."
    )


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
# int64 per row, every other tensor one entry per row; in a ragged file ``__counts__`` (int64 per row) gives each
# row's number of entries and the other tensors hold ``sum(__counts__)`` entries, row after row (a block's checksum
# covers its rows' counts and entries). Files are memory-mapped: opening one reads the header,
# the ids and the text hashes; a lookup reads only the rows it asks for. Checksums: the ids and text hashes
# are checked when a file is opened; the signal rows carry one SHA-256 per block of ``BLOCK_ROWS`` rows,
# verified for the whole file when it is opened if it is at most ``VERIFY_EAGER_BYTES`` long, otherwise the
# first time a row of the block is read (a pool larger than RAM is never read whole just to open it).
_FORMAT_NAME = "ki-trainer-signal-cache"
_IDS, _HASHES = "__ids__", "__text_hashes__"
COUNTS = "__counts__"  # a ragged part's entries per row (an ordinary per-row tensor of the part)
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


def _offsets(counts: np.ndarray) -> np.ndarray:
    """``[0, c0, c0+c1, ...]``: where each ragged row's entries start (and the total at the end)."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def _entries(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The entry positions of ragged ``rows`` (in the order of ``rows``), from the part's ``offsets``."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    before = np.zeros(len(rows), dtype=np.int64)
    np.cumsum(lengths[:-1], out=before[1:])
    return np.repeat(starts - before, lengths) + np.arange(total, dtype=np.int64)


class _MemoryPart:
    """Rows held in memory (computed by this process and not written yet)."""

    def __init__(self, ids: Sequence[str], tensors: dict[str, torch.Tensor], source: str = "memory") -> None:
        self.source = source
        self.ids = list(ids)
        self.tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        self.specs = {name: (_dtype_code(name, t.dtype, self.source), list(t.shape[1:])) for name, t in self.tensors.items()}
        self.offsets = _offsets(self.tensors[COUNTS].numpy()) if COUNTS in self.tensors else None

    def read(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Rows ``rows`` of tensor ``name`` (of a ragged one: their entries, one row after the other)."""
        if self.offsets is not None and name != COUNTS:
            rows = _entries(self.offsets, rows)
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
            buffer = np.frombuffer(self._map, dtype=_NUMPY[code], count=count, offset=start + begin) if count else \
                np.empty(0, dtype=_NUMPY[code])
            self.arrays[name] = buffer.reshape(shape)
            if name not in (_IDS, _HASHES):
                self.specs[name] = (code, shape[1:])
        self.offsets = None  # a ragged file: where each row's entries start
        if COUNTS in self.arrays:
            counts = self.arrays[COUNTS]
            if counts.dtype != np.int64 or counts.ndim != 1 or len(counts) != rows or (counts < 0).any():
                raise _corrupt(path, "the per-row entry counts are malformed")
            self.offsets = _offsets(counts)
        for name, array in self.arrays.items():
            expected = rows if self.offsets is None or name in (_HASHES, COUNTS) else int(self.offsets[-1])
            if name != _IDS and (not array.ndim or array.shape[0] != expected):
                what = "rows" if expected == rows else "entries"
                raise _corrupt(path, f"tensor {name!r} has {array.shape[0] if array.ndim else 0} {what} for {expected}"
                                     f"{'' if what == 'entries' else ' ids'}")
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
            pieces = [hashlib.sha256(self._block(name, lo, hi).tobytes()).digest() for name in sorted(self.arrays)]
            if _block_digest(pieces) != self.blocks[block]:
                raise _corrupt(self.source, f"checksum mismatch in rows {lo}..{min(hi, len(self.ids)) - 1}: the rows "
                                            "were changed after they were written")
            self._verified[block] = True

    def _block(self, name: str, lo: int, hi: int) -> np.ndarray:
        """What rows ``lo:hi`` hold of tensor ``name`` (of a ragged tensor: their entries)."""
        if self.offsets is None or name == COUNTS:
            return self.arrays[name][lo:hi]
        hi = min(hi, len(self.offsets) - 1)
        return self.arrays[name][self.offsets[lo] : self.offsets[hi]]

    def read(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Rows ``rows`` of tensor ``name`` (of a ragged one: their entries, one row after the other)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows):
            self.verify(np.unique(rows // self.block_rows).tolist())
        if self.offsets is not None and name != COUNTS:
            rows = _entries(self.offsets, rows)
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
    ``BLOCK_ROWS`` rows are in memory at a time. Written to a temporary name, then renamed (atomic). With a
    ``COUNTS`` tensor in ``specs`` the rows are ragged (see the format notes)."""
    n = len(ids)
    ids_bytes = json.dumps(list(ids)).encode("utf-8")
    hashes = np.asarray(list(text_hashes), dtype=np.int64).reshape(-1)
    names = sorted(specs)
    entries: dict[str, dict] = {}
    offset = 0
    total = n  # the first dimension of every tensor: rows, or a ragged file's entries
    if COUNTS in specs:
        total = sum(int(part.read(COUNTS, rows).sum()) for part, rows in segments if len(rows))
    # Widest dtypes first and the ids (bytes) last: every tensor starts aligned to its item size, so reads of
    # a few rows never copy a whole misaligned tensor.
    layout = [(_HASHES, "I64", [n])] + sorted(
        [(name, specs[name][0], [n if name == COUNTS else total] + list(specs[name][1])) for name in names],
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
                row, written, hasher = 0, 0, hashlib.sha256()
                for part, rows in segments:
                    lo = 0
                    while lo < len(rows):  # the rows up to the next block boundary: one block's piece
                        take = min(len(rows) - lo, (row // BLOCK_ROWS + 1) * BLOCK_ROWS - row)
                        data = _to_numpy(part.read(name, rows[lo : lo + take]))
                        piece = data.tobytes()
                        hasher.update(piece)
                        out.write(piece)
                        row, lo, written = row + take, lo + take, written + len(data)
                        if row % BLOCK_ROWS == 0 or row == n:
                            digests[(row - 1) // BLOCK_ROWS][name] = hasher.digest()
                            hasher = hashlib.sha256()
                expected = n if name == COUNTS else total
                if row != n or written != expected:
                    raise RuntimeError(f"Internal error: {written} entries of {name!r} written for {expected}.")
            out.write(ids_bytes)
            final = header([_block_digest([d[name] for name in names]) for d in digests])
            assert len(final) == len(placeholder)
            out.seek(0)
            out.write(final)
        os.replace(tmp, path)  # atomic: an interrupted write never leaves a half file under `path`
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
