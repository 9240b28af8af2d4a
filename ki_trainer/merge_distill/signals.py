"""Teacher signal for MergeDistill: top-k token probabilities at the masked positions.

- :func:`masked_lm_logits` runs the encoder once and the (vocabulary-sized) output layer ONLY at
  the positions to predict: for a 250k-token teacher the output layer dominates the cost otherwise.
- :func:`topk_to_student` keeps a teacher's top-k tokens, maps them to student ids, drops the
  mass of tokens without a student counterpart and renormalises the rest.
- :class:`TopKSignalCache` stores those signals once (student ids as int32, probabilities as fp16) on the
  signal-cache store (:mod:`ki_trainer.signal_cache`: ragged rows keyed by example id, a hash of each text, shards,
  checksums, atomic saves), in a file named by :func:`~ki_trainer.signal_cache.fingerprint.topk_fingerprint`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..signal_cache import CorruptSignalCacheError, StaleSignalCacheError, TeacherSignalCache, text_hash  # noqa: F401
from ..signal_cache.file_format import COUNTS
from ..signal_cache.fingerprint import topk_fingerprint  # noqa: F401  (the top-k cache's name; imported from here too)
from ..signal_cache.legacy import _read_legacy_topk
from ..signal_cache.shards import _read_parts

# A precompute writes its new rows as a shard next to the cache every FLUSH_ROWS rows or FLUSH_SECONDS seconds
# (temporary name, then rename): a kill loses at most those, and the next run computes only the rest.
FLUSH_ROWS = 4096
FLUSH_SECONDS = 120.0


def masked_lm_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    predict: torch.Tensor,
    columns: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Logits ``(n_predict, vocab)`` at the ``predict`` positions (row-major order).

    BERT-style (``.cls``) and RoBERTa-style (``.lm_head``) masked LMs apply their head to the selected
    hidden states only; any other masked LM falls back to its full forward. A model wrapped for
    distributed training (no ``base_model``/head attributes on the wrapper) takes the full forward too,
    so the wrapper's gradient hooks run.

    ``columns`` (1-D token ids) restricts the output layer to those tokens: logits ``(n_predict,
    len(columns))`` in that order, computed with only those rows of the decoder (for a 250k-token
    teacher and a ~10k-token student vocabulary, ~25x less work in the output layer).
    """
    head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
    base = getattr(model, "base_model", None)
    if head is not None and base is not None and base is not model:
        hidden = base(input_ids=input_ids, attention_mask=attention_mask)[0][predict]
        if columns is None:
            return head(hidden)
        restricted = _restricted_head(head, hidden, columns)
        if restricted is not None:
            return restricted
        return head(hidden)[:, columns]
    logits = model(input_ids=input_ids, attention_mask=attention_mask)[0][predict]
    return logits if columns is None else logits[:, columns]


def _restricted_head(head, hidden: torch.Tensor, columns: torch.Tensor) -> Optional[torch.Tensor]:
    """BERT's ``cls.predictions`` (transform + decoder) or RoBERTa's ``lm_head`` (dense, gelu, layer_norm,
    decoder) evaluated on the ``columns`` rows of the decoder only; ``None`` for other heads."""
    predictions = getattr(head, "predictions", None)
    if predictions is not None and hasattr(predictions, "transform") and hasattr(predictions, "decoder"):
        transformed, decoder = predictions.transform(hidden), predictions.decoder
        bias = getattr(predictions, "bias", None)
    elif all(hasattr(head, name) for name in ("dense", "layer_norm", "decoder")):
        transformed = head.layer_norm(torch.nn.functional.gelu(head.dense(hidden)))
        decoder, bias = head.decoder, getattr(head, "bias", None)
    else:
        return None
    bias = decoder.bias if decoder.bias is not None else bias  # what the head's forward adds
    weight = decoder.weight.index_select(0, columns)
    return torch.nn.functional.linear(transformed, weight, None if bias is None else bias.index_select(0, columns))


@dataclass
class TopKSignal:
    """Per predicted position: student ids ``(n, k)``, renormalised probabilities ``(n, k)`` (fp32; a row
    of zeros where no top-k token maps), and the teacher mass that mapped ``(n,)``."""

    ids: torch.Tensor
    probs: torch.Tensor
    kept_mass: torch.Tensor

    @staticmethod
    def empty(k: int, device=None) -> "TopKSignal":
        return TopKSignal(
            torch.zeros((0, k), dtype=torch.long, device=device),
            torch.zeros((0, k), device=device),
            torch.zeros((0,), device=device),
        )


def check_finite_teacher_logits(logits: torch.Tensor) -> None:
    """Raise ``TeacherNaNError`` when a teacher's masked-LM logits hold NaN/inf (one host sync per teacher batch)."""
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        from ..querying import TeacherNaNError

        bad = int((~torch.isfinite(logits).all(-1)).sum())
        raise TeacherNaNError(
            f"NaN/inf teacher masked-LM logits at {bad} of {logits.shape[0]} predicted positions: check the teacher's "
            "weights and dtype (fp16 overflow: try teacher_dtype='bfloat16' or 'float32'); training on them would "
            "make the student NaN."
        )


def topk_to_student(logits: torch.Tensor, id_map: torch.Tensor, k: int, temperature: float = 1.0) -> TopKSignal:
    """The teacher's top-k tokens at temperature ``temperature``, mapped to student ids and renormalised.

    Probabilities are taken over the FULL teacher vocabulary (fp32), the top k kept, tokens without a
    student counterpart (``id_map == -1``) dropped, and the rest renormalised to sum to one. A position
    whose top-k maps to nothing gets all-zero probabilities (it then has no KD term) and kept mass 0.
    """
    check_finite_teacher_logits(logits)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    k = min(k, probs.shape[-1])
    top_probs, top_ids = probs.topk(k, dim=-1)
    id_map = id_map.to(top_ids.device)
    inside = top_ids < len(id_map)
    mapped = torch.where(inside, id_map[top_ids.clamp(max=len(id_map) - 1)], torch.full_like(top_ids, -1))
    keep = mapped >= 0
    top_probs = top_probs * keep
    kept = top_probs.sum(dim=-1)
    renormalised = torch.where(kept[:, None] > 0, top_probs / kept.clamp_min(1e-30)[:, None], torch.zeros_like(top_probs))
    return TopKSignal(mapped.clamp_min(0), renormalised, kept)


def merge_distill_loss(
    student_logits: torch.Tensor,
    gold: torch.Tensor,
    signal: Optional[TopKSignal],
    alpha: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``alpha * KD + (1 - alpha) * MLM`` over the predicted positions, in fp32.

    KD is the soft cross-entropy ``-sum_j p_j log q_j`` between the teacher's renormalised top-k
    distribution ``p`` and the student's ``q = softmax(logits / T)`` (times ``T^2``), averaged over the
    positions that kept some teacher mass; MLM is the cross-entropy on the gold token (student id,
    ``-100`` = ignored), averaged over positions.
    """
    logits = student_logits.float()
    parts: dict[str, torch.Tensor] = {}
    loss = logits.new_zeros(())
    if alpha < 1.0:
        valid = gold != -100
        if valid.any():
            mlm = torch.nn.functional.cross_entropy(logits[valid], gold[valid])
        else:
            mlm = logits.sum() * 0.0
        parts["mlm"] = mlm.detach()
        loss = loss + (1.0 - alpha) * mlm
    if alpha > 0.0:
        if signal is None:
            raise ValueError("alpha > 0 needs teacher signals.")
        has = signal.kept_mass > 0
        if has.any():
            log_q = torch.log_softmax(logits[has] / temperature, dim=-1)
            p = signal.probs[has].float()
            picked = log_q.gather(1, signal.ids[has])
            kd = -(torch.where(p > 0, p * picked, torch.zeros_like(picked))).sum(dim=-1).mean() * temperature**2
        else:
            kd = logits.sum() * 0.0
        parts["kd"] = kd.detach()
        loss = loss + alpha * kd
    return loss, parts


class TopKSignalCache(TeacherSignalCache):
    """Top-k signals of every example on the signal-cache store (:class:`~ki_trainer.signal_cache.TeacherSignalCache`):
    ragged rows, one entry per predicted position (``ids`` int32 and ``probs`` fp16 ``(positions, k)``), keyed by
    example id with a hash of the text, in ``<signal_cache_dir>/<fingerprint>.safetensors``.

    The store's guarantees hold: rows are written as shards every ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS`` seconds
    (a kill loses at most those), :meth:`open` reads the main file and every shard, :meth:`save` compacts them, files
    are memory-mapped and checksummed (a file changed or cut off is a
    :class:`~ki_trainer.signal_cache.CorruptSignalCacheError` naming it). A cache of the earlier format
    (``<fingerprint>.pt``, ``torch.save``) is checked and migrated when met, never recomputed.
    """

    legacy_reader = staticmethod(_read_legacy_topk)

    def __init__(self, fingerprint: str, k: int, path: Optional[str] = None) -> None:
        super().__init__(fingerprint, [k], path)
        self.k = k
        self._last_flush = time.monotonic()

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.index

    def check_text(self, example_id: str, text: str) -> bool:
        """True if cached; raises if the id is cached with another text."""
        return example_id in self.index and not self.missing([example_id], [text])

    def add(self, example_ids: Sequence[str], texts: Sequence[str], counts: Sequence[int], signal: TopKSignal) -> None:
        """Append rows; ``counts[i]`` predicted positions of row i, in order, are in ``signal``."""
        if sum(counts) != len(signal.ids):
            raise ValueError(f"{sum(counts)} positions announced, {len(signal.ids)} signals given.")
        self.add_rows(example_ids, [text_hash(t) for t in texts], {
            "ids": signal.ids.to(torch.int32).cpu(), "probs": signal.probs.to(torch.float16).cpu(),
            COUNTS: torch.tensor([int(c) for c in counts], dtype=torch.int64),
        })
        pending = len(self.index) - self._pending_start
        if self.path is not None and (pending >= FLUSH_ROWS or time.monotonic() - self._last_flush >= FLUSH_SECONDS):
            self.flush()

    def finalize(self, device=None) -> "TopKSignalCache":
        return self if device is None else super().finalize(device)

    def lookup(self, example_ids: Sequence[str], counts: Sequence[int], device=None) -> TopKSignal:
        """Signals of a batch, in row order; ``counts`` (positions per row) must match what was cached."""
        if not len(example_ids):
            return TopKSignal.empty(self.k, device)
        rows = self.row_numbers(example_ids)
        cached = self._gather(COUNTS, rows).tolist()
        for example_id, count, was in zip(example_ids, counts, cached):
            if was != int(count):
                raise StaleSignalCacheError(
                    f"Example id {example_id!r}: {count} masked positions now, {was} when cached "
                    "(masking or tokenization changed); delete the cache."
                )
        ids = self._gather("ids", rows).long().to(device)
        probs = self._gather("probs", rows).float().to(device)
        return TopKSignal(ids, probs, probs.sum(dim=-1))

    @property
    def ids(self) -> torch.Tensor:
        """Every row's student ids ``(positions, k)``, int32, row after row (inspection)."""
        return self._all("ids", torch.int32)

    @property
    def probs(self) -> torch.Tensor:
        """Every row's probabilities ``(positions, k)``, fp16, row after row (inspection)."""
        return self._all("probs", torch.float16)

    @property
    def counts(self) -> list[int]:
        """Every row's number of predicted positions, in row order."""
        rows = np.arange(len(self.index), dtype=np.int64)
        return self._gather(COUNTS, rows).tolist() if len(rows) else []

    @property
    def offsets(self) -> torch.Tensor:
        """Row ``r`` owns positions ``offsets[r]:offsets[r + 1]`` of :attr:`ids` / :attr:`probs`."""
        offsets = torch.zeros(len(self.index) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(self.counts, dtype=torch.long).cumsum(0)
        return offsets

    def _all(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        if not len(self.index):
            return torch.zeros((0, self.k), dtype=dtype)
        return self._gather(name, np.arange(len(self.index), dtype=np.int64))

    @classmethod
    def open(cls, path: str, fingerprint: str, k: int) -> "TopKSignalCache":
        """The cache at ``path``: its main file and the shards of earlier, interrupted precomputes (a cache of the
        earlier format migrated first), or a new one."""
        return cls.load(path, fingerprint, k) if cls.exists(path) else cls(fingerprint, k, path)

    @classmethod
    def load(cls, path: str, fingerprint: str, k: int) -> "TopKSignalCache":
        parts, _ = _read_parts(path, fingerprint, [k], legacy_reader=cls.legacy_reader)
        cache = cls(fingerprint, k, path)
        cache._adopt(parts)
        return cache
