"""Shard files: rows written while they are computed (``<cache>.shards/<writer>-<n>.safetensors``), merged when
read, and consolidated so that reading never holds more than ``MAX_OPEN_SHARDS`` files open."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from typing import Sequence

import numpy as np

from .file_format import SUFFIX, _directory_lock, _FilePart, _merge, _write_file
from .legacy import _legacy_pending, _migrate_legacy

# Open files stay bounded (each memory-mapped file holds a descriptor): a writer merges its newest
# SHARD_MERGE_FANOUT shards of one size into one shard (sizes grow geometrically, so each row is rewritten only
# about log16(flushes) times), and reading never opens more than MAX_OPEN_SHARDS shards: beyond that they are
# first merged in batches of that many (under the directory lock).
SHARD_MERGE_FANOUT = 16
MAX_OPEN_SHARDS = 32


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
                locked: bool = False, legacy_reader=None) -> tuple[list[_FilePart], list[str]]:
    """The main file and the shards (opened and checked), plus the shard paths that were read. A format-2 cache
    of the same fingerprint is migrated first, and more than ``MAX_OPEN_SHARDS`` shards are first merged in
    batches; both change files, so both run under the directory lock: taken here unless ``locked`` says the
    caller holds it (save(); a second flock in the same process would wait for itself). ``legacy_reader``: how an
    older file of this cache kind is read (see :func:`~.legacy._migrate_legacy`)."""
    directory = path + ".shards"
    if _legacy_pending(path) or len(_shard_names(directory)) > MAX_OPEN_SHARDS:
        lock = contextlib.nullcontext() if locked else _directory_lock(os.path.dirname(os.path.abspath(path)))
        with lock:  # checked again inside: another process may have done it while this one waited
            _migrate_legacy(path, fingerprint, label_sizes, legacy_reader)
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
