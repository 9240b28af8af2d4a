"""Tiny, offline building blocks for the tests: a WordPiece tokenizer trained in-process, tiny BERT
classifiers built from configs, and a small learnable task whose classes are split across teachers."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

CLASS_WORDS = {
    "alpha": ["apple", "apricot", "avocado", "almond", "anise", "acorn"],
    "beta": ["banana", "basil", "bean", "berry", "barley", "beet"],
    "gamma": ["grape", "garlic", "ginger", "guava", "gourd", "gram"],
    "delta": ["date", "dill", "durian", "daikon", "dulse", "damson"],
}
FILLER = "the a of and to in is it that with on for as at by from or this be".split()
TEACHER_SPLIT = [["alpha", "beta"], ["gamma", "delta"]]


def make_text(label: str, rng: random.Random) -> str:
    words = rng.sample(CLASS_WORDS[label], 2) + rng.sample(FILLER, 4)
    rng.shuffle(words)
    return " ".join(words)


def make_rows(n_per_class: int, seed: int, labels=None) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"text": make_text(label, rng), "label": label} for label in (labels or CLASS_WORDS) for _ in range(n_per_class)]
    rng.shuffle(rows)
    return rows


def build_tokenizer(words=None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained in-process with `tokenizers` (no files, no Hub).

    Words outside ``words`` (default: every word of the task) become ``[UNK]``: a teacher with its own
    tokenizer has never seen the other teachers' class words, as with real specialised teachers.
    """
    words = list(words) if words is not None else [w for ws in CLASS_WORDS.values() for w in ws] + FILLER
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def build_tiny_base_model(path: Path, texts: Optional[list[str]] = None) -> Path:
    """A BERT-shaped base encoder (no classifier head) saved at ``path`` with a WordPiece tokenizer trained on
    real rows (default: 300 training rows of debian_sections20): what example and benchmark scripts load as
    their "pretrained" checkpoint in tests."""
    from ki_trainer.data import load_debian_sections

    texts = texts if texts is not None else load_debian_sections(split="train")["text"][:300]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(path)
    config = BertConfig(
        vocab_size=fast.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    return Path(path)


def teacher_words(labels) -> list[str]:
    return [w for label in labels for w in CLASS_WORDS[label]] + FILLER


def tiny_bert(num_labels: int, vocab_size: int, labels=None, dropout: float = 0.1, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    overrides.setdefault("num_hidden_layers", 2)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
        **overrides,
    )
    if labels is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    return BertForSequenceClassification(config)


def rows_with_ids(n: int = 24, seed: int = 7) -> list[dict]:
    """``n`` texts (a quarter per class) with ids ``ex0``, ``ex1``, ... and no labels."""
    return [{"id": f"ex{i}", "text": r["text"]} for i, r in enumerate(make_rows(n // 4, seed=seed))]


def flat_weights(model) -> torch.Tensor:
    """Every parameter of ``model``, flattened into one fp32 vector (to compare two trained students)."""
    return torch.cat([p.detach().flatten().float() for p in model.parameters()])


def ki_config(tmp_path, **kw):
    """A ``KnowledgeIntegrationConfig`` for a tiny CPU run writing to ``tmp_path/out`` (no saves, no reporting,
    K=2 MC samples); ``kw`` overrides any field."""
    from ki_trainer import KnowledgeIntegrationConfig

    defaults = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                    per_device_train_batch_size=8, per_device_eval_batch_size=8, mc_samples=2, seed=0)
    defaults.update(kw)
    return KnowledgeIntegrationConfig(**defaults)


def make_ki_trainer(tmp_path, tok, teachers, train, student=None, eval_dataset=None, **kw):
    """A ``KnowledgeIntegrationTrainer`` over ``teachers`` with a tiny 4-class student (or ``student``) and
    :func:`ki_config` (``kw`` overrides)."""
    from ki_trainer import KnowledgeIntegrationTrainer

    return KnowledgeIntegrationTrainer(
        model=student if student is not None else tiny_bert(4, len(tok), seed=3), args=ki_config(tmp_path, **kw),
        teachers=teachers, train_dataset=train, eval_dataset=eval_dataset, processing_class=tok,
    )


def filler_rows(n: int, seed: int) -> list[dict]:
    """Texts without class evidence (filler and unknown words); teachers learn to answer them uniformly."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.sample(FILLER, 4) + ["zzz", "qqq"]), "label": None} for _ in range(n)]


def fit_classifier(model, tokenizer, rows, labels, epochs: int = 10, lr: float = 3e-3, seed: int = 0):
    """Supervised fine-tuning of a tiny teacher (small, fast, deterministic).

    Rows whose label is ``None`` get a uniform target. Without them, a tiny teacher learns a
    shortcut ("no beta word -> alpha") and is confidently wrong on every other teacher's text,
    which no label-free method can undo; with them, it says "I don't know" when it has no evidence
    (measured: routing by certainty is then near perfect, see test_end_to_end.py).
    """
    torch.manual_seed(seed)
    num_labels = len(labels)
    label2id = {label: i for i, label in enumerate(labels)}
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    targets = torch.stack(
        [
            torch.full((num_labels,), 1.0 / num_labels)
            if r["label"] is None
            else torch.nn.functional.one_hot(torch.tensor(label2id[r["label"]]), num_labels).float()
            for r in rows
        ]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(rows)).split(32):
            logits = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx]).logits
            loss = torch.nn.functional.cross_entropy(logits, targets[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def trained_teachers():
    """Two tiny teachers trained on disjoint halves of the task (the KI setting), each with its own
    word-level tokenizer. Returns ``[(model, tokenizer), ...]``."""
    teachers = []
    for i, labels in enumerate(TEACHER_SPLIT):
        tok = build_tokenizer(teacher_words(labels))
        model = tiny_bert(len(labels), len(tok), labels=labels, seed=10 + i, dropout=0.3)
        rows = make_rows(40, seed=100 + i, labels=labels) + filler_rows(40, seed=200 + i)
        fit_classifier(model, tok, rows, labels, seed=i)
        teachers.append((model, tok))
    return teachers


@pytest.fixture
def unlabeled_train():
    return Dataset.from_list([{"text": r["text"]} for r in make_rows(48, seed=7)])


@pytest.fixture
def labeled_eval():
    return Dataset.from_list(make_rows(20, seed=8))


@pytest.fixture
def tok():
    """The student's tokenizer (a fresh one per test: tests may add tokens or change its settings)."""
    return build_tokenizer()


@pytest.fixture
def teachers(tok):
    """Two untrained tiny teachers over the two halves of the labels (``TEACHER_SPLIT``)."""
    from ki_trainer import Teacher

    return [Teacher(tiny_bert(2, len(tok), labels=labels, seed=20 + i), name=f"t{i}") for i, labels in enumerate(TEACHER_SPLIT)]
