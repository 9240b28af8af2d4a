"""Caches of format 2 (``torch.save`` payloads, ``<fingerprint>.pt`` and ``.pt.shards/``): checked as that format
was and migrated to the current format when met, never recomputed. MergeDistill's top-k caches of that time (their
own ``torch.save`` payload, format 1) are read here too (:func:`_read_legacy_topk`) and migrated the same way."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np
import torch

from .file_format import COUNTS, SUFFIX, StaleSignalCacheError, _corrupt, _MemoryPart, _merge, _write_file
from .fingerprint import hash_tensor

logger = logging.getLogger(__name__)

LEGACY_SUFFIX = ".pt"  # cache format 2 (torch.save payloads): migrated when met (see _migrate_legacy)


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
        hash_tensor(hasher.update, tensors[name])
    if payload.get("checksum") != hasher.hexdigest():
        raise _corrupt(path, "checksum mismatch: the rows were changed after they were written")
    part = _MemoryPart(ids, tensors, source=path)
    part.text_hashes = [int(h) for h in hashes]
    return part


def _read_legacy_topk(path: str, fingerprint: str, label_sizes: Sequence[int]) -> _MemoryPart:
    """A MergeDistill top-k cache file of format 1 (``torch.save``: ids, text hashes, per-row position counts, int32
    student ids and fp16 probabilities ``(positions, k)``, one checksum), checked as that format was; ragged rows
    (``COUNTS``) of the current format. ``label_sizes == [k]``."""
    k = int(label_sizes[0])
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # cut off, not a torch file, damaged zip ...
        raise _corrupt(path, f"unreadable: {type(err).__name__}") from None
    if not isinstance(payload, dict):
        raise _corrupt(path, f"it holds a {type(payload).__name__}, not a cache")
    if (payload.get("version"), payload.get("fingerprint"), payload.get("k")) != (1, fingerprint, k):
        raise StaleSignalCacheError(
            f"Top-k signal cache {path} was computed for other teachers or settings (fingerprint "
            f"{payload.get('fingerprint')!r}, expected {fingerprint!r}). Delete it or point signal_cache_dir elsewhere."
        )
    try:
        ids, hashes, counts = list(payload["ids_list"]), list(payload["text_hashes"]), list(payload["counts"])
        student_ids, probs = payload["ids"], payload["probs"]
        positions = int(sum(counts))
        consistent = len(hashes) == len(ids) == len(counts) and tuple(student_ids.shape) == (positions, k) \
            == tuple(probs.shape)
    except (KeyError, TypeError, AttributeError) as error:
        raise _corrupt(path, f"missing or malformed field: {error}") from None
    if not consistent:
        raise _corrupt(path, f"{len(ids)} rows and {positions} positions, but tensors of {tuple(student_ids.shape)} and "
                             f"{tuple(probs.shape)}")
    if "checksum" in payload:  # the earliest files have none
        hasher = hashlib.sha256(json.dumps([ids, hashes, counts]).encode())
        for key, tensor in (("ids", student_ids), ("probs", probs)):
            tensor = tensor.contiguous()
            hasher.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        if payload["checksum"] != hasher.hexdigest():
            raise _corrupt(path, "its rows do not match their checksum: changed after writing")
    part = _MemoryPart(ids, {"ids": student_ids.to(torch.int32), "probs": probs.to(torch.float16),
                             COUNTS: torch.tensor(counts, dtype=torch.int64)}, source=path)
    part.text_hashes = [int(h) for h in hashes]
    return part


def _legacy_pending(path: str) -> bool:
    """Whether ``path`` does not exist but a format-2 cache of it does (to migrate)."""
    legacy = _legacy_path(path)
    return legacy is not None and not os.path.exists(path) and (
        os.path.exists(legacy) or os.path.isdir(legacy + ".shards"))


def _migrate_legacy(path: str, fingerprint: str, label_sizes: Sequence[int], reader=None) -> bool:
    """Convert a format-2 cache (``<name>.pt`` and its ``<name>.pt.shards/*.pt``) into ``path`` (format 3) when
    ``path`` does not exist yet. The old files are checked as before and left in place (they may be deleted).
    Returns whether a conversion happened. The caller holds the directory lock (a concurrent save() of new rows
    into ``path`` must not be overwritten by a slower migration). ``reader(file, fingerprint, label_sizes)`` reads
    one old file (default: :func:`_read_legacy`; MergeDistill's top-k cache has its own older format)."""
    legacy = _legacy_path(path)
    if legacy is None or os.path.exists(path):
        return False
    files = [legacy] if os.path.exists(legacy) else []
    directory = legacy + ".shards"
    if os.path.isdir(directory):
        files += [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.endswith(LEGACY_SUFFIX)]
    if not files:
        return False
    parts = [_read_legacy(file, fingerprint) if reader is None else reader(file, fingerprint, label_sizes)
             for file in files]
    sources = [(p.source, p.ids, p.text_hashes, [(p, np.arange(len(p.ids), dtype=np.int64))]) for p in parts]
    ids, hashes, specs, segments = _merge(sources, legacy)
    _write_file(path, fingerprint, label_sizes, ids, hashes, specs, segments)
    logger.info(f"Signal cache {legacy} (an older format) migrated to {path}; the old file(s) can be deleted.")
    return True
