"""``MergeDistillConfig``: ``TrainingArguments`` plus the knobs of MergeDistill."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import TrainingArguments

from .._deprecation import renamed_field
from ..config import TEACHER_DTYPES, check_field_types, resolve_teacher_dtype
from ..signal_cache.fingerprint import cache_directory


@dataclass
class MergeDistillConfig(TrainingArguments):
    """Training arguments for :class:`~ki_trainer.merge_distill.MergeDistillTrainer`.

    Every ``TrainingArguments`` field works as usual. The fields below configure the masking, the
    teachers' top-k signal and the loss ``alpha * KD + (1 - alpha) * MLM``; all can be given on the
    command line through ``HfArgumentParser``.
    """

    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the distillation term: loss = alpha * KD + (1 - alpha) * MLM. 0 = plain MLM."},
    )
    kd_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature of the teacher's softmax (before top-k) and the student's; KD is scaled by T^2."},
    )
    top_k: int = field(
        default=8,
        metadata={"help": "Teacher tokens kept per masked position (mapped to student ids, renormalised)."},
    )
    teacher_output: str = field(
        default="full",
        metadata={
            "help": "'full': the teacher's softmax over its whole vocabulary, top-k, tokens without a student "
            "counterpart dropped and the rest renormalised. 'student_vocabulary': the teacher's output layer is "
            "evaluated only on its tokens that map to the student vocabulary (softmax over those, then top-k): the "
            "same distribution conditioned on being representable, at a fraction of the cost when the teacher's "
            "vocabulary is much larger than the student's (e.g. 250k vs 20k).",
            "choices": ["full", "student_vocabulary"],
        },
    )
    output_vocabulary: str = field(
        default="full",
        metadata={
            "help": "'full': the student's masked-LM output spans its whole vocabulary. 'training_text': the student "
            "predicts only among the student tokens that occur in the training text (logits over those columns only: "
            "much cheaper for a 250k-token tokenizer); after training the output bias of every other token is set to "
            "-100, so the saved model predicts among exactly the tokens it was trained on. Segmentation is never changed.",
            "choices": ["full", "training_text"],
        },
    )
    freeze_word_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Keep the student's word embeddings (and the decoder tied to them) as initialised: for a student "
            "started from a teacher with a large vocabulary this keeps every token's row, also those of tokens the "
            "training text never shows, in the teacher's space, and saves their gradients and optimizer state."
        },
    )
    mlm_probability: float = field(
        default=0.15,
        metadata={"help": "Share of eligible tokens predicted per text (of them 80% [MASK], 10% random, 10% kept)."},
    )
    static_masking: bool = field(
        default=False,
        metadata={
            "help": "Mask each text identically in every epoch (a function of seed and example id). Forced by "
            "signal_source='cached'; evaluation always masks statically."
        },
    )
    max_length: Optional[int] = field(
        default=None,
        metadata={"help": "Truncation length in tokens, of the student's tokenization and of each teacher's (default: "
                          "each model's position limit)."},
    )
    text_column: str = field(default="text", metadata={"help": "Dataset column holding the raw text."})
    language_column: str = field(
        default="language",
        metadata={"help": "Dataset column with each text's language; it picks the teacher (and its tokenization)."},
    )
    id_column: str = field(
        default="id",
        metadata={"help": "Dataset column with unique example ids (needed for cached teacher signals)."},
    )
    signal_source: str = field(
        default="on_the_fly",
        metadata={
            "help": "Where the teachers' top-k signals come from. 'on_the_fly' queries the teachers every step; "
            "'cached' computes every training row's top-k signal once (student ids + fp16 probabilities, static "
            "masking) so teachers need not stay in memory.",
            "choices": ["on_the_fly", "cached"],
        },
    )
    teacher_signals: Optional[str] = field(
        default=None,
        metadata={
            "help": "Deprecated name of signal_source (same values): still accepted, with a FutureWarning.",
            "choices": ["on_the_fly", "cached"],
        },
    )
    signal_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where cached top-k signals live (default: <output_dir>/teacher_signals)."},
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "Precision teachers are held in: 'auto' follows bf16/fp16 mixed precision, else float32.",
            "choices": list(TEACHER_DTYPES),
        },
    )
    release_teachers: bool = field(
        default=False,
        metadata={"help": "With cached signals, move the teachers to the CPU once the cache is built."},
    )

    def __post_init__(self) -> None:
        renamed_field(self, "teacher_signals", "signal_source", default="on_the_fly")  # the earlier name, warned
        check_field_types(self)  # max_steps=True, top_k=2.5 ...: a TypeError naming the field
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature}.")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}.")
        if self.max_length is not None and self.max_length < 3:
            raise ValueError(f"max_length must be >= 3 (two special tokens and one text token), got {self.max_length}.")
        if self.signal_source not in ("on_the_fly", "cached"):
            raise ValueError(f"signal_source must be 'on_the_fly' or 'cached', got {self.signal_source!r}.")
        if self.teacher_output not in ("full", "student_vocabulary"):
            raise ValueError(f"teacher_output must be 'full' or 'student_vocabulary', got {self.teacher_output!r}.")
        if self.output_vocabulary not in ("full", "training_text"):
            raise ValueError(f"output_vocabulary must be 'full' or 'training_text', got {self.output_vocabulary!r}.")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {list(TEACHER_DTYPES)}, got {self.teacher_dtype!r}.")
        if self.signal_source == "cached":
            self.static_masking = True

    @property
    def signals_are_cached(self) -> bool:
        """Whether the teachers' top-k signals are precomputed once and read from the signal cache."""
        return self.signal_source == "cached"

    def resolved_signal_cache_dir(self) -> str:
        """Where cached top-k signals live: ``signal_cache_dir``, else ``<output_dir>/teacher_signals``."""
        return cache_directory(self.signal_cache_dir, self.output_dir)

    def resolved_teacher_dtype(self) -> torch.dtype:
        """The dtype teachers are cast to: explicit choice, else the mixed-precision dtype, else fp32."""
        return resolve_teacher_dtype(self)
