"""Teacher signal for MergeDistill: top-k token probabilities at the masked positions.

- :func:`masked_lm_logits` runs the encoder once and the (vocabulary-sized) output layer ONLY at
  the positions to predict: for a 250k-token teacher the output layer dominates the cost otherwise.
- :func:`topk_to_student` keeps a teacher's top-k tokens, maps them to student ids, drops the
  mass of tokens without a student counterpart and renormalises the rest.
- :class:`TopKSignalCache` stores those signals once (student ids as int32, probabilities as fp16),
  keyed by example id and guarded like :mod:`ki_trainer.signal_cache` (a fingerprint of everything
  that determines the signals names the file; each row keeps a hash of its text; saves are atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..collator import tokenizer_fingerprint
from ..signal_cache import CorruptSignalCacheError, StaleSignalCacheError, hash_state_dict, hash_tensor, text_hash

CACHE_FORMAT_VERSION = 1
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


def topk_fingerprint(teachers, id_maps: Sequence[torch.Tensor], settings: dict) -> str:
    """A short hash of the teachers' weights and tokenizers, the id maps and the signal settings."""
    hasher = hashlib.sha256(f"md-topk-v{CACHE_FORMAT_VERSION}|{json.dumps(settings, sort_keys=True)}".encode())
    for teacher, id_map in zip(teachers, id_maps):
        hasher.update(json.dumps([teacher.name, teacher.languages, tokenizer_fingerprint(teacher.tokenizer)]).encode())
        hash_tensor(hasher.update, id_map)
        hash_state_dict(hasher.update, teacher.model)
    return hasher.hexdigest()[:20]


class TopKSignalCache:
    """Top-k signals of every example, flat: row ``r`` owns positions ``offsets[r]:offsets[r+1]``.

    Bound to a ``path``, it writes the rows added since the last write as a shard in ``<path>.shards/`` every
    ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS`` seconds; :meth:`open` reads the main file and every shard, and
    :meth:`save` merges them into the main file. Every file carries a checksum of its rows: a file changed or
    cut off after writing is a :class:`~ki_trainer.signal_cache.CorruptSignalCacheError` naming it.
    """

    def __init__(self, fingerprint: str, k: int, path: Optional[str] = None) -> None:
        self.fingerprint = fingerprint
        self.k = k
        self.path = path
        self.index: dict[str, int] = {}
        self.text_hashes: list[int] = []
        self.counts: list[int] = []
        self._ids: list[torch.Tensor] = []
        self._probs: list[torch.Tensor] = []
        self.ids = torch.zeros((0, k), dtype=torch.int32)
        self.probs = torch.zeros((0, k), dtype=torch.float16)
        self.offsets = torch.zeros(1, dtype=torch.long)
        self._pending = 0  # rows added since the last shard
        self._last_flush = time.monotonic()
        self._shards: list[str] = []  # shard files read or written, removed once merged into the main file

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.index

    def check_text(self, example_id: str, text: str) -> bool:
        """True if cached; raises if the id is cached with another text."""
        row = self.index.get(example_id)
        if row is None:
            return False
        if self.text_hashes[row] != text_hash(text):
            raise StaleSignalCacheError(
                f"Example id {example_id!r} is cached with a different text (cache {self.path or 'in memory'}). "
                "Ids must identify texts; delete the cache or fix the ids."
            )
        return True

    def add(self, example_ids: Sequence[str], texts: Sequence[str], counts: Sequence[int], signal: TopKSignal) -> None:
        """Append rows; ``counts[i]`` predicted positions of row i, in order, are in ``signal``."""
        if sum(counts) != len(signal.ids):
            raise ValueError(f"{sum(counts)} positions announced, {len(signal.ids)} signals given.")
        for example_id in example_ids:
            if example_id in self.index:
                raise ValueError(f"Example id {example_id!r} appears twice; ids must be unique.")
            self.index[example_id] = len(self.index)
        self.text_hashes.extend(text_hash(t) for t in texts)
        self.counts.extend(int(c) for c in counts)
        self._ids.append(signal.ids.to(torch.int32).cpu())
        self._probs.append(signal.probs.to(torch.float16).cpu())
        self._pending += len(example_ids)
        due = self._pending >= FLUSH_ROWS or time.monotonic() - self._last_flush >= FLUSH_SECONDS
        if self.path is not None and due:
            self.flush()

    def finalize(self) -> "TopKSignalCache":
        if self._ids:
            self.ids = torch.cat([self.ids, *self._ids])
            self.probs = torch.cat([self.probs, *self._probs])
            self._ids, self._probs = [], []
        self.offsets = torch.zeros(len(self.counts) + 1, dtype=torch.long)
        if self.counts:
            self.offsets[1:] = torch.tensor(self.counts, dtype=torch.long).cumsum(0)
        return self

    def lookup(self, example_ids: Sequence[str], counts: Sequence[int], device=None) -> TopKSignal:
        """Signals of a batch, in row order; ``counts`` (positions per row) must match what was cached."""
        parts_ids, parts_probs = [], []
        for example_id, count in zip(example_ids, counts):
            row = self.index.get(example_id)
            if row is None:
                raise StaleSignalCacheError(
                    f"Example id {example_id!r} has no cached teacher signals; precompute them for this dataset."
                )
            if self.counts[row] != int(count):
                raise StaleSignalCacheError(
                    f"Example id {example_id!r}: {count} masked positions now, {self.counts[row]} when cached "
                    "(masking or tokenization changed); delete the cache."
                )
            start, end = int(self.offsets[row]), int(self.offsets[row + 1])
            parts_ids.append(self.ids[start:end])
            parts_probs.append(self.probs[start:end])
        if not parts_ids:
            return TopKSignal.empty(self.k, device)
        ids = torch.cat(parts_ids).long().to(device)
        probs = torch.cat(parts_probs).float().to(device)
        return TopKSignal(ids, probs, probs.sum(dim=-1))

    # ------------------------------------------------------------------ persistence
    def _payload(self, first_row: int = 0) -> dict:
        """Rows ``first_row:`` as a file payload, with their checksum."""
        self.finalize()
        start = int(self.offsets[first_row])
        payload = {
            "version": CACHE_FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "k": self.k,
            "ids_list": list(self.index)[first_row:],
            "text_hashes": self.text_hashes[first_row:],
            "counts": self.counts[first_row:],
            "ids": self.ids[start:].clone(),
            "probs": self.probs[start:].clone(),
        }
        payload["checksum"] = _checksum(payload)
        return payload

    @staticmethod
    def _write(payload: dict, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: an interrupted save never leaves a half file

    def flush(self) -> Optional[str]:
        """Write the rows added since the last flush as a shard of ``path`` (``None`` when there are none)."""
        if self.path is None or not self._pending:
            return None
        shard = os.path.join(f"{self.path}.shards", f"{os.getpid()}-{uuid.uuid4().hex[:12]}.pt")
        self._write(self._payload(len(self.index) - self._pending), shard)
        self._shards.append(shard)
        self._pending, self._last_flush = 0, time.monotonic()
        return shard

    def save(self, path: Optional[str] = None) -> str:
        path = path or self.path
        if path is None:
            raise ValueError("No path to save the signal cache to.")
        self._write(self._payload(), path)
        self._pending = 0
        if path == self.path:  # the shards are in the main file now
            for shard in self._shards:
                try:
                    os.remove(shard)
                except FileNotFoundError:
                    pass
            self._shards = []
            try:
                os.rmdir(f"{path}.shards")
            except OSError:
                pass
        return path

    @classmethod
    def open(cls, path: str, fingerprint: str, k: int) -> "TopKSignalCache":
        """The cache at ``path``: its main file (if any) and the shards of earlier, interrupted precomputes."""
        cache = cls.load(path, fingerprint, k) if os.path.exists(path) else cls(fingerprint, k, path)
        directory = f"{path}.shards"
        names = sorted(n for n in os.listdir(directory) if n.endswith(".pt")) if os.path.isdir(directory) else []
        for name in names:
            shard = os.path.join(directory, name)
            payload = _read(shard, fingerprint, k)
            offsets = [0, *torch.tensor(payload["counts"], dtype=torch.long).cumsum(0).tolist()]
            rows = [r for r, example_id in enumerate(payload["ids_list"]) if example_id not in cache.index]
            for r in rows:  # the first file read wins an id computed twice
                cache.index[payload["ids_list"][r]] = len(cache.index)
                cache.text_hashes.append(payload["text_hashes"][r])
                cache.counts.append(payload["counts"][r])
                cache._ids.append(payload["ids"][offsets[r] : offsets[r + 1]])
                cache._probs.append(payload["probs"][offsets[r] : offsets[r + 1]])
            cache._shards.append(shard)
        return cache.finalize()

    @classmethod
    def load(cls, path: str, fingerprint: str, k: int) -> "TopKSignalCache":
        payload = _read(path, fingerprint, k)
        cache = cls(fingerprint, k, path)
        cache.index = {example_id: i for i, example_id in enumerate(payload["ids_list"])}
        cache.text_hashes = list(payload["text_hashes"])
        cache.counts = list(payload["counts"])
        cache.ids, cache.probs = payload["ids"], payload["probs"]
        return cache.finalize()

    def nbytes(self) -> int:
        return self.ids.numel() * self.ids.element_size() + self.probs.numel() * self.probs.element_size()


def _checksum(payload: dict) -> str:
    hasher = hashlib.sha256()
    hasher.update(json.dumps([payload["ids_list"], payload["text_hashes"], payload["counts"]]).encode())
    for key in ("ids", "probs"):
        tensor = payload[key].contiguous()
        hasher.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


def _read(path: str, fingerprint: str, k: int) -> dict:
    """A top-k cache file's payload, checked: readable, of these teachers and settings, consistent, unchanged."""
    def corrupt(why: str) -> CorruptSignalCacheError:
        return CorruptSignalCacheError(
            f"Top-k signal cache file {path} is corrupt ({why}). It holds only cached teacher signals: delete it and "
            "they are recomputed."
        )

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # cut off, not a torch file, damaged zip ...
        raise corrupt(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}") from None
    if not isinstance(payload, dict):
        raise corrupt(f"it holds a {type(payload).__name__}, not a cache")
    settings = (payload.get("version"), payload.get("fingerprint"), payload.get("k"))
    if settings != (CACHE_FORMAT_VERSION, fingerprint, k):
        raise StaleSignalCacheError(
            f"Top-k signal cache {path} was computed for other teachers or settings "
            f"(fingerprint {payload.get('fingerprint')!r}, expected {fingerprint!r}). Delete it or point "
            "signal_cache_dir elsewhere."
        )
    try:
        rows, positions = len(payload["ids_list"]), int(sum(payload["counts"]))
        consistent = (len(payload["text_hashes"]) == rows == len(payload["counts"])
                      and tuple(payload["ids"].shape) == (positions, k) == tuple(payload["probs"].shape))
    except (KeyError, TypeError, AttributeError) as error:
        raise corrupt(f"missing or malformed field: {error}") from None
    if not consistent:
        raise corrupt(f"{rows} rows and {positions} positions, but tensors of {tuple(payload['ids'].shape)} and "
                      f"{tuple(payload['probs'].shape)}")
    if "checksum" in payload and payload["checksum"] != _checksum(payload):  # files before the checksum have none
        raise corrupt("its rows do not match their checksum: changed after writing")
    return payload
