"""Precomputing under several processes: each computes its share of the missing rows into its own shard files,
the main process merges them, and every step ends with all processes agreeing whether any failed."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import torch

from .file_format import StaleSignalCacheError
from .store import TeacherSignalCache


def shard_positions(positions: Sequence[int], rank: int, world_size: int, chunk_size: int) -> list[int]:
    """This rank's share of ``positions``: consecutive chunks of ``chunk_size`` dealt round-robin
    (chunk ``c`` goes to rank ``c % world_size``), in their original order.

    Every chunk keeps the rows it would have in a single process, so each rank re-chunks its share into
    exactly the batches one process would compute (same padding, same per-batch MC seed, same numbers).
    """
    if world_size <= 1:
        return list(positions)
    return [p for k, p in enumerate(positions) if (k // chunk_size) % world_size == rank]


def on_every_process(accelerator, step: Callable[[], Any], what: str, path: str) -> Any:
    """Run ``step`` on this process, then agree with every process whether any failed (an all-reduce,
    which is also a barrier): this process's own error is re-raised; another's becomes a RuntimeError."""
    error: Optional[BaseException] = None
    result = None
    try:
        result = step()
    except BaseException as err:  # reported below, after every process has reached the same point
        error = err
    failed = accelerator.reduce(torch.tensor([int(error is not None)], device=accelerator.device), reduction="sum")
    if error is not None:
        raise error
    if int(failed.item()):
        raise RuntimeError(
            f"{int(failed.item())} other process(es) failed while {what} (their error is in their log). The "
            f"rows computed so far are kept in {path}.shards/ and are not recomputed next time."
        )
    return result


def sharded_signals(accelerator, open_cache: Callable[[], TeacherSignalCache], path: str, fingerprint: str,
                    sizes: list[int], build, chunk_size: int, dataset_ids: Callable[[], list[str]]):
    """Every process computes its share of the missing rows (batches dealt round-robin, see
    :func:`shard_positions`) into its own shard files; then the main process compacts them, and every process
    loads the whole cache and checks that it holds every row. Returns the cache and this process's count.

    Every step (load, compute, merge, reload, check) ends with all processes agreeing whether any of them
    failed: a failure on one process stops every process with an error (no rank waits at a barrier for a
    rank that gave up); the rows written so far stay in their shards and are skipped by the next run.
    ``signal_cache_dir`` must be one directory every process sees (a filesystem shared across nodes):
    otherwise the check after the merge fails, naming the directory.
    """
    # Every process has read the same files before any writes a shard: they find the same missing rows.
    cache = on_every_process(accelerator, open_cache, "loading the teacher-signal cache", path)
    shard = (accelerator.process_index, accelerator.num_processes, chunk_size)

    def compute():
        done = build(cache, shard)
        cache.flush()  # this process's rows, in its own shard files
        return done

    computed = on_every_process(accelerator, compute, "computing teacher signals", path)
    total = int(accelerator.reduce(torch.tensor([computed], device=accelerator.device), reduction="sum").item())

    def merge():
        if accelerator.is_main_process and (total or os.path.isdir(path + ".shards")):
            cache.save(path)  # merges every process's shards into the main file

    on_every_process(accelerator, merge, "merging the teacher-signal shards", path)
    if total:  # every process reloads, also one that computed nothing itself
        cache = on_every_process(accelerator, lambda: TeacherSignalCache.load(path, fingerprint, sizes),
                                 "loading the merged teacher-signal cache", path)

    def check():
        cache.finalize(accelerator.device)
        ids = dataset_ids()
        missing = [example_id for example_id in ids if example_id not in cache.index]
        if missing:
            raise StaleSignalCacheError(
                f"After the sharded precompute, process {accelerator.process_index} finds {len(missing)} of "
                f"{len(ids)} rows missing from {path} (e.g. id {missing[0]!r}): signal_cache_dir must be ONE "
                "directory that every process reads and writes (on several nodes: a shared filesystem). Set "
                "signal_cache_dir to a shared path, or precompute on one node first."
            )

    # The last agreement also keeps anyone from compacting again (a later call) while another still reads.
    on_every_process(accelerator, check, "checking the merged teacher-signal cache", path)
    return cache, computed
