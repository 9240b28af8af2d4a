"""Helpers of ``benchmarks/speed.py``: random-weight models, synthetic and real batches, timers, FLOPs.

Nothing here imports ``datasets`` or ``evaluate`` (the GPU image has neither): the debian texts are
read with ``lzma`` + ``json`` and the cached-signals precompute gets a tiny column table that offers
the part of the ``datasets.Dataset`` API that ``ki_trainer`` uses (``column_names``, ``ds[column]``,
``ds[row]``, ``len``).
"""

from __future__ import annotations

import copy
import gc
import json
import lzma
import os
import random
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import BertConfig, BertForSequenceClassification

REPO = Path(__file__).resolve().parent.parent
DEBIAN = REPO / "data" / "debian_sections20.jsonl.xz"

# Architecture presets. Only speed matters: weights are random.
SIZES: dict[str, dict[str, int]] = {
    # BERT-base: 12 x 768, 12 heads, FFN 3072 (the H100 reference of issue 5)
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    # MiniLM-L6-like: 6 x 384, 12 heads, FFN 1536 (all-MiniLM-L6-v2's shape)
    "small": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    # smoke tests only
    "tiny": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512),
}

CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


# ---------------------------------------------------------------------------------------------- models
def bert_config(size: str, num_labels: int, max_positions: int = 512, vocab_size: int = 30522) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        **SIZES[size],
    )


def build_models(size: str, labels_per_teacher: int, num_teachers: int, seed: int = 0, vocab_size: int = 30522):
    """A student over the union and ``num_teachers`` teachers over disjoint label sets (CPU, fp32, random)."""
    torch.manual_seed(seed)
    teacher_labels = [[f"t{t}_c{c}" for c in range(labels_per_teacher)] for t in range(num_teachers)]
    union = [label for labels in teacher_labels for label in labels]
    student = BertForSequenceClassification(bert_config(size, len(union), vocab_size=vocab_size))
    student.config.id2label = dict(enumerate(union))
    student.config.label2id = {label: i for i, label in enumerate(union)}
    teachers = []
    for labels in teacher_labels:
        model = BertForSequenceClassification(bert_config(size, len(labels), vocab_size=vocab_size))
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        teachers.append(model)
    return student, teachers, teacher_labels


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


def count_params(model: torch.nn.Module, embeddings: bool = False) -> int:
    total = 0
    for name, p in model.named_parameters():
        if not embeddings and ".embeddings." in f".{name}":
            continue
        total += p.numel()
    return total


# ---------------------------------------------------------------------------------------------- FLOPs
def forward_flops(cfg: BertConfig, batch: int, seq: int, layers: Optional[int] = None, head: bool = True) -> float:
    """Matmul FLOPs of one BERT forward over ``batch x seq`` PROCESSED (padded) tokens.

    2 FLOPs per multiply-add of every weight matrix per token (= 2 x non-embedding params x tokens),
    plus the attention scores and their weighted sum (2 x 2 x seq x d per token and layer), plus the
    pooler and classifier once per sequence. Embedding lookups, layer norms, softmax, GELU: ignored.
    """
    d, f = cfg.hidden_size, cfg.intermediate_size
    layers = cfg.num_hidden_layers if layers is None else layers
    per_token_layer = 2 * (4 * d * d + 2 * d * f) + 4 * seq * d
    flops = batch * seq * layers * per_token_layer
    if head:
        flops += batch * 2 * (d * d + d * cfg.num_labels)
    return float(flops)


def step_flops(
    student_cfg: BertConfig,
    teacher_cfgs: Sequence[BertConfig],
    batch: int,
    seq: int,
    mode: str,
    mc_samples: int,
    top_layers: Optional[int] = None,
) -> dict[str, float]:
    """FLOPs of one training step: student fwd+bwd (3x forward) plus the teacher queries of ``mode``."""
    student = 3 * forward_flops(student_cfg, batch, seq)
    teachers = 0.0
    if mode in ("naive", "ours", "ours_fp32", "ours_nocheck", "query"):
        for cfg in teacher_cfgs:
            teachers += (1 + mc_samples) * forward_flops(cfg, batch, seq)
    elif mode == "top":
        for cfg in teacher_cfgs:
            lower = cfg.num_hidden_layers - top_layers
            teachers += forward_flops(cfg, batch, seq)  # deterministic pass
            teachers += forward_flops(cfg, batch, seq, layers=lower, head=False)  # shared lower layers
            teachers += mc_samples * forward_flops(cfg, batch, seq, layers=top_layers, head=True)
    elif mode not in ("student", "cached"):
        raise ValueError(mode)
    return {"student": student, "teachers": teachers, "total": student + teachers}


# ---------------------------------------------------------------------------------------------- data
def synthetic_rows(n: int, seq: int, vocab_size: int, seed: int) -> list[dict[str, Any]]:
    """``n`` rows of ``seq`` random token ids ([CLS] ... [SEP], no padding), with an id, a text and a label."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab_size, (n, seq), generator=gen)
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    labels = torch.randint(0, 2, (n,), generator=gen)
    return [
        {"id": f"ex{seed}_{i}", "text": " ".join(map(str, ids[i].tolist())), "input_ids": ids[i].tolist(), "label": int(labels[i])}
        for i in range(n)
    ]


class PretokenizedCollator:
    """Stacks rows that already hold ``input_ids`` (same length); passes ids along for cached signals."""

    def __init__(self, with_ids: bool = False, with_labels: bool = True) -> None:
        self.with_ids = with_ids
        self.with_labels = with_labels

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
        batch: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": (ids != PAD_ID).long(),
            "token_type_ids": torch.zeros_like(ids),
        }
        if self.with_labels:
            batch["labels"] = torch.tensor([row["label"] for row in rows], dtype=torch.long)
        if self.with_ids:
            batch["example_ids"] = [str(row["id"]) for row in rows]
        return batch


class ColumnTable(torch.utils.data.Dataset):
    """The slice of the ``datasets.Dataset`` API that ki_trainer's cached-signal precompute uses."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.column_names = list(rows[0]) if rows else []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self.rows]
        return self.rows[key]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def load_debian_texts(split: str = "train") -> list[str]:
    with lzma.open(DEBIAN, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [row["text"] for row in rows if row["split"] == split]


def load_tokenizer(path: Optional[str], texts: Sequence[str]):
    """A BERT-uncased WordPiece tokenizer: ``path`` if given, else the locally assembled
    paraphrase-MiniLM-L3-v2 one (bert-base-uncased vocabulary) if present, else one trained in-process
    on ``texts`` (no network in any case). Returns ``(tokenizer, description)``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    candidates = [path] if path else []
    base = os.environ.get("KI_TRAINER_CACHE")
    root = (Path(base).expanduser() if base else Path.home() / ".cache" / "ki_trainer") / "models"
    candidates += [str(root / "paraphrase-MiniLM-L3-v2"), str(root / "all-MiniLM-L6-v2")]
    for candidate in candidates:
        if candidate and any(Path(candidate, name).exists() for name in ("tokenizer.json", "vocab.txt")):
            return AutoTokenizer.from_pretrained(candidate), candidate
    if path:
        raise FileNotFoundError(f"No tokenizer in {path!r}.")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=30522, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    return fast, "WordPiece (vocab 30522) trained in-process on the debian train texts"


def length_grouped(lengths: Sequence[int], batch_size: int, seed: int, mega: int = 50) -> list[list[int]]:
    """Batches of indices with similar lengths (HF LengthGroupedSampler's idea): shuffle, cut into
    mega-batches of ``mega x batch_size``, sort each by length, cut into batches, shuffle the batches."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), mega * batch_size):
        chunk = sorted(order[start : start + mega * batch_size], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    """Seconds per call of ``fn``; CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn: Callable[[int], Any], calls: int, start: int = 0) -> float:
        """Mean seconds per call over ``calls`` consecutive calls ``fn(start) ... fn(start + calls - 1)``."""
        self.sync()
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for i in range(start, start + calls):
                fn(i)
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1000.0 / calls
        t0 = time.perf_counter()
        for i in range(start, start + calls):
            fn(i)
        return (time.perf_counter() - t0) / calls

    def measure(self, fn: Callable[[int], Any], warmup: int, repeats: int, calls_per_repeat: int) -> dict[str, Any]:
        """Warm-up calls, then the median over ``repeats`` of the mean time per call."""
        for i in range(warmup):
            fn(i)
        times = [self.once(fn, calls_per_repeat, warmup + r * calls_per_repeat) for r in range(repeats)]
        return {"seconds": statistics.median(times), "all_seconds": times}


# ---------------------------------------------------------------------------------------------- memory
def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_report(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "peak_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "peak_reserved_mib": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
        }
    # Linux ru_maxrss is in KiB; it is the PROCESS-WIDE high-water mark, cumulative over the run.
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    current = None
    try:
        with open("/proc/self/statm") as handle:
            current = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass
    return {"rss_hwm_mib_cumulative": round(hwm, 1), "rss_now_mib": round(current, 1) if current else None}


def synthetic_tokenizer(vocab_size: int = 1000):
    """A small WordPiece tokenizer (no training): synthetic rows are pre-tokenized, but the cached-signal
    fingerprint hashes the student's tokenizer, so the cached trainer is given this one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab.update({f"w{i}": i + 5 for i in range(vocab_size - 5)})
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
