"""Filling a cache: which file serves a run (:class:`SignalPrecompute`), and computing the rows it lacks with a
:class:`~ki_trainer.querying.TeacherQuerier` (one process, several processes, or one pass over a stream)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..guards import check_writable
from ..dataset_checks import check_texts, column_names, column_values, is_streaming
from ..numerics import certainty_from_logits
from ..strategies import TeacherSignals
from .distributed import shard_positions, sharded_signals
from .file_format import SUFFIX
from .fingerprint import teachers_fingerprints, text_hash
from .store import TeacherSignalCache

logger = logging.getLogger(__name__)


def batch_seed(seed: int, ids: Sequence[str]) -> int:
    """The MC-dropout seed of one precompute batch: a hash of the run seed and the batch's example ids,
    so the draws depend on the rows, never on which process computed them or on what ran before."""
    digest = hashlib.blake2b(json.dumps([int(seed), [str(i) for i in ids]]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def check_can_add(cache: TeacherSignalCache, lacking: str, example_id: str) -> None:
    """Before computing rows a cache lacks: its directory must take them (a read-only shared cache can only be
    read). The probe is :func:`ki_trainer.guards.check_writable`'s."""
    if cache.path is None:
        return
    directory = os.path.dirname(os.path.abspath(cache.path))
    try:
        check_writable(directory, "signal_cache_dir")
    except PermissionError as err:
        raise PermissionError(
            f"The signal cache in {directory!r} lacks {lacking} (e.g. id {example_id!r}), and {err} Use a writable "
            "signal_cache_dir (a copy of this cache there is reused), or a dataset whose rows it holds."
        ) from None


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
    if todo:
        check_can_add(cache, f"{len(todo)} of the {len(ids)} rows", ids[todo[0]])
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
        if batches == 0:
            check_can_add(cache, "rows of the stream", str(batch[0][id_column]))
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
                    "set id_column=, or use signal_source='on_the_fly'."
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


class SignalPrecompute:
    """The cached teacher signals of one run: which file serves a dataset, and the rows it lacks computed with
    ``querier`` (a :class:`~ki_trainer.querying.TeacherQuerier`).

    ``needs`` is what the run's strategy/router read (:class:`~ki_trainer.routing.fitting.SignalNeeds`): a cache
    holds at least that. The trainer passes it to every :meth:`load` (derived then, so a strategy or router replaced
    after construction is what counts); ``needs`` here is the default of a load given none (e.g. the pass that
    reads a stream's ids for :meth:`dataset_ids`), and every load's ``needs`` becomes the new default. Files live in ``<signal_cache_dir>/<fingerprint><suffix>.safetensors``; ``caches`` keeps
    every cache opened, by file.
    """

    def __init__(self, querier, args, accelerator, teachers, student_tokenizer, collator, needs=None) -> None:
        self.querier = querier
        self.args = args
        self.accelerator = accelerator
        self.teachers = teachers
        self.student_tokenizer = student_tokenizer
        self.collator = collator
        self.needs = needs  # what the last load served (a streamed dataset's ids are read with the same)
        self.caches: dict[str, TeacherSignalCache] = {}
        # ids of iterable datasets, read by their precompute pass: {id(dataset): (reference to it, ids)}; the
        # reference is checked on lookup, so a new dataset at a freed one's address never gets its ids.
        self.streamed_ids: dict[int, tuple[Callable[[], Any], list[str]]] = {}
        self.progress_processes = 1  # under several processes the main one's progress bar counts every row

    # ------------------------------------------------------------------ which file
    def fingerprints(self, kinds: list[tuple[bool, bool]]) -> list[str]:
        """The fingerprint of each ``(with MC, with features)`` kind, reading every teacher weight once: teacher
        weights, labels, tokenization, truncation, MC samples and dtype, and what the cache holds."""
        from ..collator import KnowledgeIntegrationCollator

        collator = self.collator
        lengths = [
            collator.groups[key][1] if key is not None else collator.max_length
            for key in (collator.teacher_input_key(t) for t in range(len(self.teachers)))
        ] if isinstance(collator, KnowledgeIntegrationCollator) else [None] * len(self.teachers)
        variants = [
            (self.args.mc_samples if mc else 0, self.args.mc_top_layers if mc else None, features) for mc, features in kinds
        ]
        return teachers_fingerprints(
            self.teachers, self.student_tokenizer, lengths, self.args.resolved_teacher_dtype(), variants
        )

    def choose(self, file_suffix: str, mc: bool, features: bool, dataset=None) -> tuple[str, str, bool, bool]:
        """(fingerprint, path, with MC, with features) of the cache to use: the first that exists (loaded or on
        disk) of the exact kind and the richer kinds (also MC statistics, also pooled features), else the exact
        kind, new.

        A cache with MC statistics that this run does not read is taken only when extending it with ``dataset``'s
        missing rows (K dropout passes each) costs no more teacher passes than one deterministic pass over every
        row into a new cache of the exact kind; a run over mostly NEW rows then does not pay for MC passes it
        never reads."""
        directory = self.args.resolved_signal_cache_dir()
        kinds = list(dict.fromkeys([(mc, features), (mc, True), (True, features), (True, True)]))
        choices = []
        for (with_mc, with_features), fingerprint in zip(kinds, self.fingerprints(kinds)):
            path = os.path.join(directory, f"{fingerprint}{file_suffix}{SUFFIX}")
            choice = (fingerprint, path, with_mc, with_features)
            if path in self.caches or TeacherSignalCache.exists(path):
                if with_mc and not mc and not self.extending_is_cheaper(path, fingerprint, dataset):
                    continue
                return choice
            choices.append(choice)
        return choices[0]

    def extending_is_cheaper(self, path: str, fingerprint: str, dataset) -> bool:
        """Whether adding ``dataset``'s rows missing from the MC cache at ``path`` (1 + K·m/L passes each, with
        ``mc_top_layers=m`` of L layers) costs at most one deterministic pass over all its rows. Streamed datasets
        (ids unknown before their pass) always extend."""
        if dataset is None or is_streaming(dataset):
            return True
        cache = self.open(path, fingerprint, [len(t.labels) for t in self.teachers])
        ids = set(self.dataset_ids(dataset))
        missing = len(ids - cache.index.keys())
        if missing == 0:
            return True
        share = 1.0
        layers = [getattr(getattr(t.model, "config", None), "num_hidden_layers", None) for t in self.teachers]
        if self.args.mc_top_layers is not None and all(isinstance(n, int) and n > 0 for n in layers):
            share = min(1.0, self.args.mc_top_layers / min(layers))
        return missing * (1.0 + self.args.mc_samples * share) <= len(ids)

    def open(self, path: str, fingerprint: str, sizes: list[int]) -> TeacherSignalCache:
        """The cache already loaded for ``path``, else its main file + shards of earlier writers, else a new one."""
        known = self.caches.get(path)
        if known is not None and known.fingerprint == fingerprint:
            return known
        if TeacherSignalCache.exists(path):
            return TeacherSignalCache.load(path, fingerprint, sizes)
        return TeacherSignalCache(fingerprint, sizes, path)

    # ------------------------------------------------------------------ filling it
    def load(self, dataset, file_suffix: str = "", mc: Optional[bool] = None,
             features: Optional[bool] = None, needs=None) -> TeacherSignalCache:
        """The cache in ``<signal_cache_dir>/<fingerprint><file_suffix>.safetensors``, extended with ``dataset``'s
        missing rows. It holds at least what the run reads, ``needs`` (and MC statistics / features when ``mc`` /
        ``features``)."""
        if needs is not None:
            self.needs = needs
        if self.needs is None:
            raise ValueError("SignalPrecompute.load needs what the run reads (needs=SignalNeeds(...)).")
        fingerprint, path, with_mc, with_features = self.choose(
            file_suffix, bool(mc) or self.needs.mc, bool(features) or self.needs.features, dataset
        )
        sizes = [len(t.labels) for t in self.teachers]
        accelerator = self.accelerator
        device = accelerator.device
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        batches = lambda todo: self.batches(dataset, todo, features=with_features, mc=with_mc)  # noqa: E731
        if is_streaming(dataset):  # one pass over the stream; the ids are kept for the router / normalization
            def build(cache, shard=(0, 1, 1)):
                computed, ids = self.streamed(cache, dataset, with_features, shard[:2], mc=with_mc)
                self.remember_stream_ids(dataset, ids)
                return computed
        else:
            def build(cache, shard=(0, 1, 1)):
                return build_or_update_cache(cache, dataset, self.args.id_column, self.args.text_column, batches, shard)
        # fork_rng: the MC draws here must not shift the data order or dropout of the training run.
        with torch.random.fork_rng(devices=rng_devices):
            if accelerator.num_processes > 1:
                self.progress_processes = accelerator.num_processes
                try:
                    cache, computed = sharded_signals(
                        accelerator, lambda: self.open(path, fingerprint, sizes), path, fingerprint, sizes, build,
                        self.args.per_device_eval_batch_size, lambda: self.dataset_ids(dataset),
                    )
                finally:
                    self.progress_processes = 1
            else:
                cache = self.open(path, fingerprint, sizes)
                computed = build(cache)
                cache.finalize(device)
                if computed or os.path.isdir(path + ".shards"):
                    cache.save(path)  # compacts this run's and other writers' shards into the main file
        logger.info(f"Teacher signals: {computed} computed, {len(cache) - computed} reused from {path}.")
        self.caches[path] = cache
        return cache

    def streamed(self, cache: TeacherSignalCache, dataset, features: bool, shard: tuple[int, int], mc: bool = True):
        """Fill ``cache`` from a dataset that can only be iterated: one pass, one batch in memory (see
        :func:`build_or_update_cache_streaming`). Returns (missing rows, all ids)."""
        from tqdm.auto import tqdm

        disable = self.args.disable_tqdm or not self.accelerator.is_main_process
        with tqdm(unit="rows", desc="Teacher signals (stream)", disable=disable) as bar:
            def compute(rows: list[dict]) -> TeacherSignals:
                signals = self.rows(rows, features, mc)
                bar.update(len(rows) * shard[1])
                return signals

            return build_or_update_cache_streaming(
                cache, dataset, self.args.id_column, self.args.text_column, compute,
                self.args.per_device_eval_batch_size, shard,
            )

    def rows(self, rows: list[dict], features: Optional[bool] = None, mc: bool = True) -> TeacherSignals:
        """Teacher signals of one precompute batch (MC ones, ``mc``, with dropout seeded by the batch's example ids)."""
        ids = [str(row.get(self.args.id_column)) for row in rows]
        features = self.needs.features if features is None else features
        return self.querier.rows(rows, ids, seed=batch_seed(self.args.seed, ids), mc=mc, features=features)

    def batches(self, dataset, positions: list[int], features: Optional[bool] = None, mc: bool = True):
        """Teacher signals of ``positions`` in batches of ``per_device_eval_batch_size``, each batch's MC dropout
        seeded by its example ids (:func:`batch_seed`): the cache does not depend on how many processes computed
        it. Under several processes the main one's progress bar counts all rows (its own times the number of
        processes)."""
        from tqdm.auto import tqdm

        size = self.args.per_device_eval_batch_size
        processes = self.progress_processes
        total = len(positions) * processes
        disable = self.args.disable_tqdm or not positions or not self.accelerator.is_main_process
        with tqdm(total=total, unit="rows", desc="Teacher signals", disable=disable) as bar:
            for start in range(0, len(positions), size):
                chunk = positions[start : start + size]
                yield chunk, self.rows([dataset[p] for p in chunk], features, mc)
                bar.update(min(len(chunk) * processes, total - bar.n))

    # ------------------------------------------------------------------ datasets
    def dataset_ids(self, dataset) -> list[str]:
        """Every example id of ``dataset`` (of a streamed one: as read by its precompute pass)."""
        if is_streaming(dataset):
            ids = self.known_stream_ids(dataset)
            if ids is None:
                self.load(dataset)
                ids = self.known_stream_ids(dataset)
            return ids
        return [str(x) for x in column_values(dataset, self.args.id_column)]

    def known_stream_ids(self, dataset) -> Optional[list[str]]:
        entry = self.streamed_ids.get(id(dataset))
        return entry[1] if entry is not None and entry[0]() is dataset else None

    def remember_stream_ids(self, dataset, ids: list[str]) -> None:
        for key in [k for k, (ref, _) in self.streamed_ids.items() if ref() is None]:
            del self.streamed_ids[key]  # datasets that are gone
        try:
            reference = weakref.ref(dataset)
        except TypeError:  # not weakly referenceable: keep it alive instead
            reference = (lambda kept: lambda: kept)(dataset)
        self.streamed_ids[id(dataset)] = (reference, ids)

    def dataset_digest(self, dataset) -> str:
        """A short hash of a dataset's ids and texts."""
        ids = [str(x) for x in column_values(dataset, self.args.id_column)]
        hashes = [text_hash(t) if isinstance(t, str) else 0 for t in column_values(dataset, self.args.text_column)]
        return hashlib.blake2b(json.dumps([ids, hashes]).encode(), digest_size=6).hexdigest()

    def for_evaluation(self, dataset, metric_key_prefix: str, needs=None) -> Optional[TeacherSignalCache]:
        """The cached signals of an evaluation set (``None`` when its rows have no ids, or it is streamed: those
        are queried live). Each ``metric_key_prefix`` AND dataset content gets its own file
        (``<fingerprint>.<prefix>.<digest>.safetensors``): evaluation sets reusing ids of other splits never collide."""
        usable = dataset is not None and not is_streaming(dataset) and self.args.id_column in column_names(dataset)
        if not usable:
            return None
        suffix = "." + re.sub(r"[^A-Za-z0-9_-]", "_", metric_key_prefix) + "." + self.dataset_digest(dataset)
        return self.load(dataset, file_suffix=suffix, needs=needs)
