"""MergeDistill: merge pre-trained masked LMs with different vocabularies into one multilingual student.

Design (this project's; the paper body was not available, see docs/merge_distill.md): a student
vocabulary that unites the teachers' (WordPiece ``##`` and SentencePiece ``▁`` conventions
normalised), per-teacher id maps with coverage, texts tokenized and masked by their language's
teacher and mapped to student ids, and a loss ``alpha * KD(teacher top-k) + (1 - alpha) * MLM`` at
the masked positions.
"""

from .collator import MergeDistillCollator
from .config import MergeDistillConfig
from .alignment import TeacherAlignment, segmentation_agreement
from .evaluation import fine_tune_accuracy, linear_probe_accuracy, mean_pooled_features, score_masked_lm, select_teachers
from .masking import example_generator, mask_tokens
from .signals import TopKSignal, TopKSignalCache, masked_lm_logits, merge_distill_loss, topk_to_student
from .student import build_student, fit_linear_map, init_student_embeddings
from .teacher import MaskedLMTeacher
from .trainer import MergeDistillTrainer
from .vocabulary import (
    StudentVocabulary,
    TeacherCoverage,
    build_union_tokenizer,
    choose_student_tokenizer,
    count_tokens,
    normalize_token,
)

__all__ = [
    "MaskedLMTeacher",
    "MergeDistillCollator",
    "MergeDistillConfig",
    "MergeDistillTrainer",
    "StudentVocabulary",
    "TeacherAlignment",
    "TeacherCoverage",
    "TopKSignal",
    "TopKSignalCache",
    "build_student",
    "build_union_tokenizer",
    "count_tokens",
    "example_generator",
    "choose_student_tokenizer",
    "fine_tune_accuracy",
    "fit_linear_map",
    "init_student_embeddings",
    "linear_probe_accuracy",
    "mask_tokens",
    "masked_lm_logits",
    "mean_pooled_features",
    "merge_distill_loss",
    "normalize_token",
    "score_masked_lm",
    "segmentation_agreement",
    "select_teachers",
    "topk_to_student",
]
