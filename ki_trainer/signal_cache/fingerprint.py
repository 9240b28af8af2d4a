"""What names a cache file: a fingerprint of everything that determines the teachers' signals for a text.

Teacher weights are hashed ONE way (:func:`hash_state_dict`: each tensor's name, shape, dtype and bytes, in name
order); the signal cache, MergeDistill's top-k cache and checkpoints (:func:`weights_digest`) use it. Checkpoints
have always recorded the name, shape and dtype as one ``name|shape|dtype`` string: that layout is kept (so the
digests recorded by existing checkpoints still match), the walk over the weights is the same. The values are pinned by
``tests/signal_cache/test_fingerprints_pinned.py``: caches written by earlier versions keep their names.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional, Sequence

import torch

from ..collator import tokenizer_fingerprint
from ..teacher import Teacher

# The format part of the fingerprint, frozen at 2: since format 3 each file names its format in its header, so
# the same teachers and settings keep their fingerprint and a format-2 cache is migrated, not recomputed.
_FINGERPRINT_FORMAT = 2
# Bump when the way signals are computed from a teacher changes (querying.py / numerics.py): old caches
# then get another fingerprint and are never reused.
SIGNAL_COMPUTATION_VERSION = 2  # 2: MC mutual information and top-class variance, optional features
_CONFIG_KEYS_IGNORED = ("_name_or_path", "transformers_version", "_commit_hash")
DEFAULT_DIRECTORY = "teacher_signals"  # under output_dir, when no signal_cache_dir is given


def cache_directory(signal_cache_dir: Optional[str], output_dir: str) -> str:
    """Where a run's cached signals live: ``signal_cache_dir``, else ``<output_dir>/teacher_signals`` (knowledge
    integration and MergeDistill alike)."""
    return signal_cache_dir or os.path.join(output_dir, DEFAULT_DIRECTORY)


def _host_bytes(tensor: torch.Tensor) -> tuple[torch.Tensor, bytes]:
    """The tensor on the host (contiguous) and its raw bytes."""
    data = tensor.detach().to("cpu").contiguous()
    return data, data.view(torch.uint8).numpy().tobytes() if data.numel() else b""


def hash_tensor(update: Callable[[bytes], None], tensor: torch.Tensor) -> None:
    """Feed a tensor's shape, dtype and bytes to ``update`` (a hasher's ``update``)."""
    data, raw = _host_bytes(tensor)
    update(str((tuple(data.shape), str(data.dtype))).encode())
    update(raw)


_hash_tensor = hash_tensor  # the name earlier versions (and their tests) used


def hash_state_dict(update: Callable[[bytes], None], model: torch.nn.Module, layout: str = "signals") -> None:
    """Feed every tensor of ``model.state_dict()`` (in name order) to ``update``: the one way teacher weights are
    hashed. ``layout="signals"``: the name, then :func:`hash_tensor`; ``layout="checkpoint"``: ``name|shape|dtype``,
    then the bytes (what checkpoints have recorded from the start)."""
    if layout not in ("signals", "checkpoint"):
        raise ValueError(f"layout must be 'signals' or 'checkpoint', got {layout!r}.")
    for name, tensor in sorted(model.state_dict().items()):
        if layout == "signals":
            update(name.encode())
            hash_tensor(update, tensor)
        else:
            data, raw = _host_bytes(tensor)
            update(f"{name}|{tuple(data.shape)}|{data.dtype}".encode())
            update(raw)


def weights_digest(model: torch.nn.Module) -> str:
    """The short digest of a model's weights that checkpoints record (:func:`hash_state_dict`, checkpoint layout)."""
    hasher = hashlib.sha256()
    hash_state_dict(hasher.update, model, layout="checkpoint")
    return hasher.hexdigest()[:20]


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
        hash_state_dict(update, teacher.model)
    return [hasher.hexdigest()[:20] for hasher in hashers]


_TOPK_FINGERPRINT_FORMAT = 1  # frozen: MergeDistill's top-k caches keep their names across file formats


def topk_fingerprint(teachers, id_maps: Sequence[torch.Tensor], settings: dict) -> str:
    """What names a MergeDistill top-k cache: the teachers' names, languages, tokenizers and weights, the id maps
    (teacher -> student tokens) and the signal settings."""
    hasher = hashlib.sha256(f"md-topk-v{_TOPK_FINGERPRINT_FORMAT}|{json.dumps(settings, sort_keys=True)}".encode())
    for teacher, id_map in zip(teachers, id_maps):
        hasher.update(json.dumps([teacher.name, teacher.languages, tokenizer_fingerprint(teacher.tokenizer)]).encode())
        hash_tensor(hasher.update, id_map)
        hash_state_dict(hasher.update, teacher.model)
    return hasher.hexdigest()[:20]


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
