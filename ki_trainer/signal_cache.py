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
  immutable shard files ``<cache>.shards/<writer>-<n>.pt`` (written to a temporary name, then renamed):
  a bad row, a kill or a full disk near the end keeps every shard written so far;
- loading merges the main file and every shard (rows by id), so several writers (processes sharing
  a cache directory, or later one writer per rank) never overwrite each other; :meth:`save`
  compacts the shards into the main file under an exclusive lock on the directory;
- every file carries a checksum of its rows; a garbage, cut or tampered file is one clear
  :class:`CorruptSignalCacheError` that names it (it holds only derived data and can be deleted).

The data model is a generic dict of named per-row tensors (any names, dtypes and trailing shapes):
``tensors[name][i]`` belongs to ``ids[i]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from .collator import tokenizer_fingerprint
from .numerics import certainty_from_logits
from .strategies import TeacherSignals
from .teacher import Teacher

CACHE_FORMAT_VERSION = 2
# Bump when the way signals are computed from a teacher changes (querying.py / numerics.py): old caches
# then get another fingerprint and are never reused.
SIGNAL_COMPUTATION_VERSION = 2  # 2: MC mutual information and top-class variance, optional features
FLUSH_ROWS = 4096  # rows computed between two shard writes (at most this much work is lost on a kill)
FLUSH_SECONDS = 120.0  # ... or this much time
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


def _hash_tensor(hasher, tensor: torch.Tensor) -> None:
    data = tensor.detach().to("cpu").contiguous()
    hasher.update(str((tuple(data.shape), str(data.dtype))).encode())
    hasher.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")


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
    """A short hash of everything that determines the teachers' signals for a given text."""
    settings = (
        f"ki-signals-v{CACHE_FORMAT_VERSION}.{SIGNAL_COMPUTATION_VERSION}|K={mc_samples}|top={mc_top_layers}|{dtype}"
    )
    if features:
        settings += "|features"  # caches that also hold every teacher's pooled features (feature routers)
    hasher = hashlib.sha256(settings.encode())
    for teacher, length in zip(teachers, max_lengths):
        tokenizer = teacher.tokenizer or student_tokenizer
        tokenization = tokenizer_fingerprint(tokenizer) if tokenizer is not None else "custom-collator"
        adapter = getattr(teacher, "adapter", None)  # adapter teachers share one model: name the adapter
        hasher.update(json.dumps([teacher.labels, length, tokenization] + ([adapter] if adapter else [])).encode())
        hasher.update(model_config_fingerprint(teacher.model).encode())
        for name, tensor in sorted(teacher.model.state_dict().items()):
            hasher.update(name.encode())
            _hash_tensor(hasher, tensor)
    return hasher.hexdigest()[:20]


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _checksum(ids: Sequence[str], text_hashes: Sequence[int], tensors: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256(json.dumps([list(ids), list(text_hashes)]).encode())
    for name in sorted(tensors):
        hasher.update(name.encode())
        _hash_tensor(hasher, tensors[name])
    return hasher.hexdigest()


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


def _write_atomic(payload: dict, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: an interrupted write never leaves a half file under `path`
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class TeacherSignalCache:
    """Per-example signals: deterministic logits (all teachers, concatenated), deterministic and MC
    certainty, MC mutual information and top-class variance, each teacher's pooled features (fp16,
    ``features_<t>``, when a router needs them), and any other named per-row tensor. Lives on one device; :meth:`lookup` gathers a batch
    by example id.

    Persistence: ``path`` is the main file; rows computed since the last write go to shard files in
    ``<path>.shards/`` (see :meth:`flush`); :meth:`load` merges both, :meth:`save` compacts them.
    """

    def __init__(self, fingerprint: str, label_sizes: Sequence[int], path: Optional[str] = None) -> None:
        self.fingerprint = fingerprint
        self.label_sizes = list(label_sizes)
        self.path = path
        self.index: dict[str, int] = {}
        self.text_hashes: list[int] = []
        self._rows: dict[str, list[torch.Tensor]] = {"logits": [], "deterministic": [], "mc": []}
        self.tensors: dict[str, torch.Tensor] = {}
        self._pending: list[dict[str, torch.Tensor]] = []  # row blocks added since the last flush
        self._pending_start = 0  # index of the first unflushed row
        self._last_flush = time.monotonic()
        self._writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._shard_count = 0

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
            "mc": signals.certainty.float().cpu(),
        }
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
        for example_id in ids:
            if example_id in self.index:
                raise ValueError(f"Example id {example_id!r} appears twice; ids must be unique.")
            self.index[example_id] = len(self.index)
        self.text_hashes.extend(int(h) for h in text_hashes)
        rows = {name: tensor.detach().cpu() for name, tensor in rows.items()}
        for name, tensor in rows.items():
            self._rows.setdefault(name, []).append(tensor)
        self._pending.append(rows)

    def maybe_flush(self) -> None:
        """:meth:`flush` when ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS`` have passed since the last one."""
        pending = len(self.index) - self._pending_start
        if pending and (pending >= FLUSH_ROWS or time.monotonic() - self._last_flush >= FLUSH_SECONDS):
            self.flush()

    def flush(self) -> Optional[str]:
        """Write the rows added since the last flush as one new shard file; returns its path."""
        self._last_flush = time.monotonic()
        if self.path is None or not self._pending:
            return None
        names = list(self._pending[0])
        tensors = {name: torch.cat([block[name] for block in self._pending]) for name in names}
        ids = list(self.index)[self._pending_start :]
        hashes = self.text_hashes[self._pending_start :]
        directory = self.path + ".shards"
        os.makedirs(directory, exist_ok=True)
        shard = os.path.join(directory, f"{self._writer}-{self._shard_count:06d}.pt")
        _write_atomic(self._payload(ids, hashes, tensors), shard)
        self._shard_count += 1
        self._pending = []
        self._pending_start = len(self.index)
        return shard

    def finalize(self, device: torch.device) -> "TeacherSignalCache":
        parts = {k: v for k, v in self._rows.items() if v}
        if parts:
            old = {k: [self.tensors[k].cpu()] if k in self.tensors else [] for k in parts}
            self.tensors = {**self.tensors, **{k: torch.cat(old[k] + v) for k, v in parts.items()}}
            self._rows = {k: [] for k in self._rows}
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    # ------------------------------------------------------------------ use
    def lookup(self, ids: Sequence[str], certainty_source: Optional[str]) -> TeacherSignals:
        try:
            rows = [self.index[example_id] for example_id in ids]
        except KeyError as err:
            raise StaleSignalCacheError(
                f"Example id {err.args[0]!r} has no cached teacher signals; precompute them for this dataset."
            ) from None
        logits = self.tensors["logits"]
        index = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
        batch_logits = list(logits.index_select(0, index).split(self.label_sizes, dim=1))
        certainty = None
        if certainty_source is not None:
            certainty = self.tensors[certainty_source].index_select(0, index)
        extra: dict = {}
        for name in ("mutual_information", "top_variance"):
            if name in self.tensors:
                extra[name] = self.tensors[name].index_select(0, index)
        if "features_0" in self.tensors:
            extra["features"] = [
                self.tensors[f"features_{t}"].index_select(0, index).float() for t in range(len(self.label_sizes))
            ]
        return TeacherSignals(logits=batch_logits, certainty=certainty, **extra)

    def __len__(self) -> int:
        return len(self.index)

    # ------------------------------------------------------------------ persistence
    def _payload(self, ids: Sequence[str], text_hashes: Sequence[int], tensors: dict[str, torch.Tensor]) -> dict:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return {
            "version": CACHE_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "label_sizes": self.label_sizes,
            "ids": list(ids),
            "text_hashes": [int(h) for h in text_hashes],
            "tensors": tensors,
            "checksum": _checksum(ids, text_hashes, tensors),
        }

    def save(self, path: Optional[str] = None) -> str:
        """Compact: merge the main file, every shard (also other writers') and the rows in memory into
        the main file, then delete the merged shards. Serialised by a lock on the directory."""
        path = path or self.path
        if path is None:
            raise ValueError("No path to save the signal cache to.")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        if any(self._rows.values()):
            self.finalize(next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu"))
        with _directory_lock(directory):
            parts, shards = _read_parts(path, self.fingerprint)
            ids, hashes, tensors = list(self.index), list(self.text_hashes), dict(self.tensors)
            merged = _merge([("memory", ids, hashes, tensors)] + parts, path)
            _write_atomic(self._payload(*merged), path)
            for shard in shards:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(shard)
            with contextlib.suppress(OSError):
                os.rmdir(path + ".shards")  # only when empty
        self._pending = []
        self._pending_start = len(self.index)
        return path

    @classmethod
    def load(cls, path: str, fingerprint: str, label_sizes: Sequence[int]) -> "TeacherSignalCache":
        """The main file ``path`` merged with every shard in ``<path>.shards/`` (either may be missing)."""
        parts, _ = _read_parts(path, fingerprint)
        cache = cls(fingerprint, label_sizes, path)
        if parts:
            ids, hashes, tensors = _merge(parts, path)
            cache.index = {example_id: i for i, example_id in enumerate(ids)}
            cache.text_hashes = list(hashes)
            cache.tensors = tensors
        cache._pending_start = len(cache.index)
        return cache

    @staticmethod
    def exists(path: str) -> bool:
        """Whether a main file or shards exist for ``path``."""
        shards = path + ".shards"
        return os.path.exists(path) or (os.path.isdir(shards) and any(n.endswith(".pt") for n in os.listdir(shards)))


def _read_file(path: str, fingerprint: str) -> tuple[str, list, list, dict]:
    """One cache file, checked: readable, the expected fingerprint, consistent lengths, checksum."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch's own message suggests weights_only=False: never pass that on
        raise _corrupt(path, f"unreadable: {type(err).__name__}") from None
    keys = ("version", "fingerprint", "ids", "text_hashes", "tensors")
    if not isinstance(payload, dict) or any(k not in payload for k in keys):
        raise _corrupt(path, "not a signal cache payload")
    if payload["version"] != CACHE_FORMAT_VERSION or payload["fingerprint"] != fingerprint:
        raise StaleSignalCacheError(
            f"Signal cache {path} was computed for other teachers or settings "
            f"(fingerprint {payload.get('fingerprint')!r}, format {payload.get('version')!r}; expected {fingerprint!r}, "
            f"format {CACHE_FORMAT_VERSION}). Delete it or point signal_cache_dir elsewhere."
        )
    ids, hashes, tensors = payload["ids"], payload["text_hashes"], payload["tensors"]
    if not isinstance(tensors, dict) or not all(torch.is_tensor(t) for t in tensors.values()):
        raise _corrupt(path, "tensors missing")
    if len(hashes) != len(ids):
        raise _corrupt(path, f"{len(ids)} ids but {len(hashes)} text hashes")
    for name, tensor in tensors.items():
        if tensor.dim() == 0 or tensor.shape[0] != len(ids):
            raise _corrupt(path, f"tensor {name!r} has {tuple(tensor.shape)[:1] or 0} rows for {len(ids)} ids")
    if payload.get("checksum") != _checksum(ids, hashes, tensors):
        raise _corrupt(path, "checksum mismatch: the rows were changed after they were written")
    return path, list(ids), list(hashes), dict(tensors)


def _read_parts(path: str, fingerprint: str) -> tuple[list, list[str]]:
    """The main file and the shards (as read), plus the shard paths that were read."""
    parts, shards = [], []
    if os.path.exists(path):
        parts.append(_read_file(path, fingerprint))
    directory = path + ".shards"
    names = sorted(n for n in os.listdir(directory) if n.endswith(".pt")) if os.path.isdir(directory) else []
    for name in names:
        shard = os.path.join(directory, name)
        try:
            parts.append(_read_file(shard, fingerprint))
        except FileNotFoundError:  # compacted by another writer in the meantime: its rows are in the main file
            continue
        shards.append(shard)
    return parts, shards


def _merge(parts: list, where: str) -> tuple[list[str], list[int], dict[str, torch.Tensor]]:
    """Union of rows by id (first occurrence wins; the same id with another text is a stale cache)."""
    ids: list[str] = []
    hashes: list[int] = []
    seen: dict[str, int] = {}
    blocks: dict[str, list[torch.Tensor]] = {}
    names = None
    for source, part_ids, part_hashes, tensors in parts:
        if not part_ids:
            continue
        if names is None:
            names = sorted(tensors)
        elif sorted(tensors) != names:
            raise _corrupt(source, f"tensors {sorted(tensors)} differ from the other files' {names}")
        keep = []
        for i, (example_id, h) in enumerate(zip(part_ids, part_hashes)):
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
        if keep:
            index = torch.tensor(keep, dtype=torch.long)
            for name in names:
                tensor = tensors[name].cpu()
                blocks.setdefault(name, []).append(tensor if len(keep) == len(part_ids) else tensor.index_select(0, index))
    merged = {name: torch.cat(block) for name, block in blocks.items()}
    return ids, hashes, merged


def check_texts(texts: Sequence, ids: Optional[Sequence] = None, where: str = "dataset", column: str = "text") -> None:
    """Cheap scan before any expensive work: every text is a str that encodes as UTF-8.

    Raises naming the first bad row (position and id), instead of failing in the middle of an epoch or
    of a precompute.
    """
    for position, text in enumerate(texts):
        problem = None
        if not isinstance(text, str):
            problem = f"is {type(text).__name__} {text!r:.40}, not a string"
        else:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                problem = f"is not valid text ({err.reason} at character {err.start}, e.g. a lone surrogate)"
        if problem is not None:
            who = f"row {position}" + (f" (id {ids[position]!r})" if ids is not None else "")
            raise ValueError(f"{where}: column {column!r} at {who} {problem}. Fix or drop the row.")


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
    (signals carrying MC certainty). Rows are flushed to shard files as they are computed; on an
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


def column_names(dataset) -> list[str]:
    """Column names of a ``datasets.Dataset``, or the keys of the first row of any indexable dataset."""
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else (list(dataset[0]) if len(dataset) else [])


def column_values(dataset, name: str) -> list:
    """One column as a list; works without ``datasets`` (lists of dicts, torch Datasets of dicts)."""
    if getattr(dataset, "column_names", None) is not None:
        return list(dataset[name])
    return [dataset[i][name] for i in range(len(dataset))]
