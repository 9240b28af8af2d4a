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
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable, Optional, Sequence

import torch

from .collator import tokenizer_fingerprint
from .numerics import certainty_from_logits
from .strategies import TeacherSignals
from .teacher import Teacher

CACHE_FORMAT_VERSION = 1


class StaleSignalCacheError(RuntimeError):
    """A cached signal no longer matches the example or teachers it claims to describe."""


def _hash_tensor(hasher, tensor: torch.Tensor) -> None:
    data = tensor.detach().to("cpu").contiguous()
    hasher.update(str((tuple(data.shape), str(data.dtype))).encode())
    hasher.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def teachers_fingerprint(
    teachers: Sequence[Teacher],
    student_tokenizer,
    max_lengths: Sequence[Optional[int]],
    mc_samples: int,
    dtype: torch.dtype,
    mc_top_layers: Optional[int] = None,
) -> str:
    """A short hash of everything that determines the teachers' signals for a given text."""
    settings = f"ki-signals-v{CACHE_FORMAT_VERSION}|K={mc_samples}|top={mc_top_layers}|{dtype}"
    hasher = hashlib.sha256(settings.encode())
    for teacher, length in zip(teachers, max_lengths):
        tokenizer = teacher.tokenizer or student_tokenizer
        tokenization = tokenizer_fingerprint(tokenizer) if tokenizer is not None else "custom-collator"
        hasher.update(json.dumps([teacher.labels, length, tokenization]).encode())
        for name, tensor in sorted(teacher.model.state_dict().items()):
            hasher.update(name.encode())
            _hash_tensor(hasher, tensor)
    return hasher.hexdigest()[:20]


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


class TeacherSignalCache:
    """Per-example signals: deterministic logits (all teachers, concatenated), deterministic and MC
    certainty. Lives on one device; :meth:`lookup` gathers a batch by example id."""

    def __init__(self, fingerprint: str, label_sizes: Sequence[int], path: Optional[str] = None) -> None:
        self.fingerprint = fingerprint
        self.label_sizes = list(label_sizes)
        self.path = path
        self.index: dict[str, int] = {}
        self.text_hashes: list[int] = []
        self._rows: dict[str, list[torch.Tensor]] = {"logits": [], "deterministic": [], "mc": []}
        self.tensors: dict[str, torch.Tensor] = {}

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
        for example_id in ids:
            if example_id in self.index:
                raise ValueError(f"Example id {example_id!r} appears twice; ids must be unique.")
            self.index[example_id] = len(self.index)
        self.text_hashes.extend(text_hash(text) for text in texts)
        self._rows["logits"].append(torch.cat(signals.logits, dim=1).float().cpu())
        self._rows["deterministic"].append(deterministic.float().cpu())
        self._rows["mc"].append(signals.certainty.float().cpu())

    def finalize(self, device: torch.device) -> "TeacherSignalCache":
        parts = {k: v for k, v in self._rows.items() if v}
        if parts:
            old = {k: [self.tensors[k].cpu()] if k in self.tensors else [] for k in parts}
            self.tensors = {k: torch.cat(old[k] + v) for k, v in parts.items()}
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
        return TeacherSignals(logits=batch_logits, certainty=certainty)

    def __len__(self) -> int:
        return len(self.index)

    # ------------------------------------------------------------------ persistence
    def save(self, path: Optional[str] = None) -> str:
        path = path or self.path
        if path is None:
            raise ValueError("No path to save the signal cache to.")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        payload = {
            "version": CACHE_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "label_sizes": self.label_sizes,
            "ids": list(self.index),
            "text_hashes": self.text_hashes,
            "tensors": {k: v.cpu() for k, v in self.tensors.items()},
        }
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: an interrupted save never leaves a half cache
        return path

    @classmethod
    def load(cls, path: str, fingerprint: str, label_sizes: Sequence[int]) -> "TeacherSignalCache":
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("version") != CACHE_FORMAT_VERSION or payload.get("fingerprint") != fingerprint:
            raise StaleSignalCacheError(
                f"Signal cache {path} was computed for other teachers or settings "
                f"(fingerprint {payload.get('fingerprint')!r}, expected {fingerprint!r}). Delete it or point "
                "signal_cache_dir elsewhere."
            )
        cache = cls(fingerprint, label_sizes, path)
        cache.index = {example_id: i for i, example_id in enumerate(payload["ids"])}
        cache.text_hashes = list(payload["text_hashes"])
        cache.tensors = dict(payload["tensors"])
        return cache


def build_or_update_cache(
    cache: TeacherSignalCache,
    dataset,
    id_column: str,
    text_column: str,
    batches: Callable[[list[int]], Iterable[tuple[list[int], TeacherSignals]]],
) -> int:
    """Compute signals for the dataset rows the cache lacks; returns how many were computed.

    ``batches(positions)`` yields ``(positions, signals)`` for the requested dataset positions
    (signals carrying MC certainty).
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
    todo = cache.missing(ids, texts)
    for positions, signals in batches(todo):
        deterministic = torch.stack([certainty_from_logits(logits) for logits in signals.logits], dim=1)
        cache.add([ids[p] for p in positions], [texts[p] for p in positions], signals, deterministic)
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
