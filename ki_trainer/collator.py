"""Batches raw text for the student AND for every teacher that reads it with its own tokenizer.

Keeping the raw text in the dataset and tokenizing in the collator is what makes heterogeneous
ensembles possible: each model gets its own vocabulary, special tokens, truncation length and
dynamic padding. Teachers that share the student's tokenizer (and length) reuse its encoding, and
teachers sharing one tokenizer share one encoding.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .label_space import LabelSpace
from .peft_support import unwrap
from .teacher import model_position_limit

TEACHER_INPUTS_KEY = "teacher_inputs"
EXAMPLE_IDS_KEY = "example_ids"
GOLD_LABEL_FALLBACK = "labels"  # the column name HF scripts use after `rename_column("label", "labels")`
IGNORED_LABEL = -100  # a row without a gold label (skipped by the metrics)
_UNBOUNDED_TOKENIZER_LENGTH = 1_000_000


def _missing_label(value: Any) -> bool:
    """None, NaN, or a negative id (``datasets`` marks unlabeled rows with -1)."""
    if value is None or isinstance(value, str):
        return value is None
    try:
        return bool(value != value) or value < 0
    except TypeError:
        return False


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Equal fingerprints mean identical encodings: the full serialized fast tokenizer (normalizer,
    pre-tokenizer, vocabulary, post-processor), or the vocabulary and class for slow ones, and the side
    that truncation cuts."""
    fingerprint = getattr(tokenizer, "_ki_fingerprint", None)
    if fingerprint is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            text = backend.to_str()
        else:
            text = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        text = f"{type(tokenizer).__name__}|{tokenizer.padding_side}|{tokenizer.pad_token}|{text}"
        fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        try:
            tokenizer._ki_fingerprint = fingerprint
        except AttributeError:
            pass
    side = getattr(tokenizer, "truncation_side", "right")
    if side != "right":
        # Left truncation keeps another part of a long text. Read on every call (the attribute can change after
        # the first); the default side adds nothing, so right-truncating fingerprints and their caches stay as they were.
        fingerprint = hashlib.sha256(f"{fingerprint}|truncation_side={side}".encode()).hexdigest()[:16]
    return fingerprint


def check_can_pad(tokenizer: PreTrainedTokenizerBase, who: str) -> None:
    if tokenizer.pad_token is None:
        raise ValueError(
            f"The {who} tokenizer ({type(tokenizer).__name__}) has no pad token, which batching needs. "
            "Set one, e.g. `tokenizer.pad_token = tokenizer.eos_token` (and the model's config.pad_token_id)."
        )


class KnowledgeIntegrationCollator:
    """Turn dataset rows ``{text_column: str, label_column: label?, ...}`` into a KI batch.

    The batch holds the student's inputs (``input_ids``, ``attention_mask`` ...), ``labels`` (union
    ids) when every row carries a gold label, and under ``"teacher_inputs"`` one encoding per
    distinct teacher tokenization. :meth:`teacher_input_key` says where teacher ``t`` reads.

    Args:
        tokenizer: the student's tokenizer.
        teacher_tokenizers: per teacher, its own tokenizer or ``None`` to read the student's encoding.
        label_space: maps gold label names/ids to union ids.
        max_length: student truncation length.
        teacher_max_lengths: per teacher truncation length (``None``: same as the student's).
        pad_to_multiple_of: e.g. 8 for tensor cores under mixed precision.
        id_column: when set and present, the rows' ids are passed along as ``batch["example_ids"]``
            (a list of strings) so cached teacher signals can be looked up.
        student_collator: the user's own padding collator (e.g. ``DataCollatorWithPadding``) applied to
            pre-tokenized rows. Rows that carry ``input_ids`` (tokenized by the user's own ``map``, with the
            user's truncation) are padded as they are, never re-tokenized; teachers sharing the student's
            tokenizer read the same ids, teachers with their own tokenizer read the raw text.

    Gold labels are read from ``label_column`` or, when the rows have no such key, from ``"labels"``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        label_space: LabelSpace,
        teacher_tokenizers: Optional[Sequence[Optional[PreTrainedTokenizerBase]]] = None,
        text_column: str = "text",
        label_column: Optional[str] = "label",
        max_length: Optional[int] = None,
        teacher_max_lengths: Optional[Sequence[Optional[int]]] = None,
        pad_to_multiple_of: Optional[int] = None,
        id_column: Optional[str] = None,
        student_collator: Optional[Any] = None,
    ) -> None:
        check_can_pad(tokenizer, "student")
        num_teachers = label_space.num_teachers
        teacher_tokenizers = list(teacher_tokenizers) if teacher_tokenizers is not None else [None] * num_teachers
        teacher_max_lengths = list(teacher_max_lengths) if teacher_max_lengths is not None else [None] * num_teachers
        if len(teacher_tokenizers) != num_teachers or len(teacher_max_lengths) != num_teachers:
            raise ValueError(f"Expected one tokenizer and max length per teacher ({num_teachers}).")
        self.tokenizer = tokenizer
        self.label_space = label_space
        self.text_column = text_column
        self.label_column = label_column
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.id_column = id_column
        self.student_collator = student_collator

        # Group teachers by (tokenization, length): equal tokenizers share one encoding, and teachers
        # tokenizing exactly like the student read the student's (group None).
        self.groups: dict[str, tuple[PreTrainedTokenizerBase, Optional[int]]] = {}
        self._teacher_keys: list[Optional[str]] = []
        student_print = tokenizer_fingerprint(tokenizer)
        group_prints: dict[tuple[str, Optional[int]], str] = {}
        for t, (tok, length) in enumerate(zip(teacher_tokenizers, teacher_max_lengths)):
            length = length if length is not None else max_length
            tok = tok if tok is not None else tokenizer
            fingerprint = tokenizer_fingerprint(tok)
            if fingerprint == student_print and length == max_length:
                self._teacher_keys.append(None)
                continue
            check_can_pad(tok, f"teacher {label_space.teacher_names[t]!r}")
            key = group_prints.get((fingerprint, length))
            if key is None:
                key = group_prints[(fingerprint, length)] = f"group_{len(self.groups)}"
                self.groups[key] = (tok, length)
            self._teacher_keys.append(key)

    def teacher_input_key(self, teacher: int) -> Optional[str]:
        """Key under ``batch["teacher_inputs"]`` teacher ``teacher`` reads, or ``None`` for the student's inputs."""
        return self._teacher_keys[teacher]

    def _encode(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: Optional[int]) -> dict:
        return dict(
            tokenizer(
                texts,
                padding=True,
                truncation=max_length is not None,
                max_length=max_length,
                pad_to_multiple_of=self.pad_to_multiple_of,
                return_tensors="pt",
            )
        )

    def _pretokenized(self, features: list[dict[str, Any]]) -> dict:
        """Pad the rows' own token ids (the user's tokenization and truncation) for the student."""
        keys = [k for k in features[0] if k in set(self.tokenizer.model_input_names) | {"input_ids"}]
        if self.max_length is not None:
            for i, row in enumerate(features):
                if len(row["input_ids"]) > self.max_length:
                    raise ValueError(
                        f"Pre-tokenized row {i} has {len(row['input_ids'])} tokens but the student reads at most "
                        f"{self.max_length} (max_length). Tokenize with truncation=True, max_length={self.max_length}, "
                        "or raise max_length in KnowledgeIntegrationConfig."
                    )
        rows = [{k: row[k] for k in keys} for row in features]
        if self.student_collator is not None:
            batch = dict(self.student_collator(rows))
        else:
            batch = dict(
                self.tokenizer.pad(rows, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
            )
        batch.pop("labels", None)
        batch.pop("label", None)
        return batch

    def gold_label_column(self, row: dict[str, Any]) -> Optional[str]:
        """The key gold labels are read from: ``label_column``, else ``"labels"`` (else none)."""
        if self.label_column and self.label_column in row:
            return self.label_column
        if self.label_column and GOLD_LABEL_FALLBACK in row:
            return GOLD_LABEL_FALLBACK
        return None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("Cannot collate an empty batch.")
        pretokenized = "input_ids" in features[0]
        needs_text = not pretokenized or bool(self.groups)
        if needs_text and self.text_column not in features[0]:
            if pretokenized:
                own = [self.label_space.teacher_names[t] for t, key in enumerate(self._teacher_keys) if key is not None]
                raise KeyError(
                    f"Teacher(s) {own} tokenize the raw text with their own tokenizer (or length), but the rows have "
                    f"only token ids and no text column {self.text_column!r} (columns: {sorted(features[0])}). "
                    "Keep the text column when you tokenize (do not pass remove_columns= to map)."
                )
            if self.student_collator is not None:
                raise KeyError(
                    f"The data_collator you passed ({type(self.student_collator).__name__}) pads token ids, but the rows "
                    f"have neither input_ids nor a text column {self.text_column!r} (columns: {sorted(features[0])}). "
                    "Tokenize first (dataset.map(tokenize)), or drop data_collator= and keep the raw text."
                )
            raise KeyError(
                f"Rows have no text column {self.text_column!r} (columns: {sorted(features[0])}). "
                "Set text_column= in KnowledgeIntegrationConfig."
            )
        texts = [row[self.text_column] for row in features] if needs_text else None
        if texts is not None:
            bad = [type(text).__name__ for text in texts if not isinstance(text, str)]
            if bad:
                raise TypeError(f"Column {self.text_column!r} must hold strings; found {sorted(set(bad))}.")

        if pretokenized:
            batch = self._pretokenized(features)
        elif self.student_collator is not None:
            raise KeyError(
                f"The data_collator you passed ({type(self.student_collator).__name__}) pads token ids, but the rows "
                f"have raw text and no input_ids. Either tokenize first (dataset.map(tokenize)), or drop data_collator= "
                "and the trainer tokenizes the raw text itself."
            )
        else:
            batch = self._encode(self.tokenizer, texts, self.max_length)
        gold = self.gold_label_column(features[0])
        if gold and any(gold in row for row in features):
            # Rows without a gold label (None or a negative id, the datasets convention) get -100, which the
            # metrics skip: the labels of every batch then line up with its predictions.
            values = [row.get(gold) for row in features]
            known = [i for i, value in enumerate(values) if not _missing_label(value)]
            labels = [IGNORED_LABEL] * len(values)
            for i, encoded in zip(known, self.label_space.encode(values[i] for i in known)):
                labels[i] = encoded
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        if self.id_column and self.id_column in features[0]:
            batch[EXAMPLE_IDS_KEY] = [str(row[self.id_column]) for row in features]
        if self.groups:
            batch[TEACHER_INPUTS_KEY] = {
                key: self._encode(tok, texts, length) for key, (tok, length) in self.groups.items()
            }
        return batch


def checked_max_length(tokenizer: PreTrainedTokenizerBase, config, requested: Optional[int], who: str) -> int:
    """The truncation length for one model: the request, checked against the model's limit."""
    limits = [limit for limit in (model_position_limit(config), tokenizer.model_max_length) if limit]
    limits = [int(limit) for limit in limits if limit < _UNBOUNDED_TOKENIZER_LENGTH]
    limit = min(limits) if limits else None
    if requested is None:
        return limit if limit is not None else 512
    if limit is not None and requested > limit:
        raise ValueError(f"max_length={requested} exceeds what the {who} can read ({limit} tokens).")
    return requested


def build_collator(model, tokenizer, teachers: Sequence, label_space: LabelSpace, args,
                   student_collator=None) -> KnowledgeIntegrationCollator:
    """The default collator of a run: the student's and each teacher's truncation length checked against what
    the model can read (a teacher sharing the student's tokenizer, without its own ``max_length``, reads at most
    what the student reads)."""
    for teacher in teachers:
        teacher.check_reads(tokenizer)
    student_length = checked_max_length(tokenizer, unwrap(model).config, args.max_length, "student")
    teacher_lengths = []
    for teacher in teachers:
        own_tokenizer = teacher.tokenizer or tokenizer
        requested = teacher.max_length if teacher.max_length is not None else args.max_length
        length = checked_max_length(own_tokenizer, teacher.model.config, requested, f"teacher {teacher.name!r}")
        teacher_lengths.append(min(length, student_length) if teacher.tokenizer is None and requested is None else length)
    return KnowledgeIntegrationCollator(
        tokenizer,
        label_space,
        teacher_tokenizers=[t.tokenizer for t in teachers],
        text_column=args.text_column,
        label_column=args.label_column,
        max_length=student_length,
        teacher_max_lengths=teacher_lengths,
        pad_to_multiple_of=8 if (args.bf16 or args.fp16) else None,
        id_column=args.id_column if args.signals_are_cached else None,
        student_collator=student_collator,
    )


def collator_for(data_collator, tokenizer, student, teachers: Sequence, label_space: LabelSpace, args, train_dataset):
    """The run's collator and the student's tokenizer: the user's :class:`KnowledgeIntegrationCollator` as given,
    else the default one, wrapped around a user's padding collator (e.g. ``DataCollatorWithPadding`` from a
    converted script: it pads the pre-tokenized student ids, the KI collator adds gold labels, ids and the
    teachers' own encodings)."""
    from .dataset_checks import check_user_collator

    if isinstance(data_collator, KnowledgeIntegrationCollator):
        return data_collator, tokenizer
    user_collator = data_collator
    if user_collator is not None:
        tokenizer = tokenizer or getattr(user_collator, "tokenizer", None)
        check_user_collator(user_collator, train_dataset, args)
    if tokenizer is None:
        raise ValueError(
            "KnowledgeIntegrationTrainer tokenizes raw text itself: pass the student's tokenizer as "
            "`processing_class=` (or your own `data_collator=`)."
        )
    return build_collator(student, tokenizer, teachers, label_space, args, user_collator), tokenizer


def split_batch(inputs: dict) -> tuple[dict, dict, Optional[list]]:
    """A collated batch split into the student's inputs (gold labels removed: they never enter the training
    loss), the teachers' own encodings and the example ids."""
    student_inputs = dict(inputs)
    teacher_batches = student_inputs.pop(TEACHER_INPUTS_KEY, {})
    example_ids = student_inputs.pop(EXAMPLE_IDS_KEY, None)
    student_inputs.pop("labels", None)
    return student_inputs, teacher_batches, example_ids


def without_gold_labels(collator):
    """A copy of a :class:`KnowledgeIntegrationCollator` that reads no gold labels (training batches: labels never
    enter the loss, so a training label outside the union, or a malformed one, is ignored instead of failing
    mid-epoch); any other collator unchanged."""
    if not isinstance(collator, KnowledgeIntegrationCollator) or not collator.label_column:
        return collator
    collator = copy.copy(collator)
    collator.label_column = None
    return collator
