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

What keeps memory flat: files are memory-mapped (safetensors layout, see :mod:`.file_format`); only
the ids and text hashes are held in memory, a lookup reads just the rows it asks for, and compaction
streams rows block by block. A pool larger than RAM works.

The data model is a generic dict of named per-row tensors (any names, dtypes and trailing shapes):
``tensors[name][i]`` belongs to ``ids[i]``.

The package's rooms: :mod:`.fingerprint` (what names a file), :mod:`.file_format` (one file: layout, checksums,
atomic writes), :mod:`.legacy` (format-2 files, migrated), :mod:`.shards` (rows written as they are computed),
:mod:`.store` (:class:`TeacherSignalCache`), :mod:`.precompute` (filling a cache with a querier's signals) and
:mod:`.distributed` (the same under several processes).
"""

from ..dataset_checks import check_texts, column_names, column_values, is_streaming
from .distributed import on_every_process, shard_positions, sharded_signals
from .file_format import (
    BLOCK_ROWS,
    CACHE_FORMAT_VERSION,
    SUFFIX,
    VERIFY_EAGER_BYTES,
    CorruptSignalCacheError,
    StaleSignalCacheError,
)
from .fingerprint import (
    _FINGERPRINT_FORMAT,
    SIGNAL_COMPUTATION_VERSION,
    _hash_tensor,
    hash_state_dict,
    hash_tensor,
    model_config_fingerprint,
    teachers_fingerprint,
    teachers_fingerprints,
    text_hash,
)
from .legacy import LEGACY_SUFFIX
from .precompute import SignalPrecompute, batch_seed, build_or_update_cache, build_or_update_cache_streaming
from .shards import MAX_OPEN_SHARDS, SHARD_MERGE_FANOUT
from .store import FLUSH_ROWS, FLUSH_SECONDS, TeacherSignalCache

__all__ = [
    "BLOCK_ROWS",
    "CACHE_FORMAT_VERSION",
    "FLUSH_ROWS",
    "FLUSH_SECONDS",
    "LEGACY_SUFFIX",
    "MAX_OPEN_SHARDS",
    "SHARD_MERGE_FANOUT",
    "SIGNAL_COMPUTATION_VERSION",
    "SUFFIX",
    "VERIFY_EAGER_BYTES",
    "CorruptSignalCacheError",
    "SignalPrecompute",
    "StaleSignalCacheError",
    "TeacherSignalCache",
    "batch_seed",
    "build_or_update_cache",
    "build_or_update_cache_streaming",
    "check_texts",
    "column_names",
    "column_values",
    "hash_state_dict",
    "hash_tensor",
    "is_streaming",
    "model_config_fingerprint",
    "on_every_process",
    "shard_positions",
    "sharded_signals",
    "teachers_fingerprint",
    "teachers_fingerprints",
    "text_hash",
]
