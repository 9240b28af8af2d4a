"""Setting up a MergeDistill run: which teacher reads each language, the datasets checked before any work, the
truncation lengths, and the student ids that occur in the training text."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..signal_cache import column_names, column_values
from ..teacher import model_position_limit
from .config import MergeDistillConfig
from .teacher import MaskedLMTeacher
from .vocabulary import StudentVocabulary


def language_map(teachers: Sequence[MaskedLMTeacher], given: Optional[dict[str, str]]) -> dict[str, str]:
    """Which teacher reads each language: ``given`` (checked), else each teacher's own languages (each once)."""
    names = [t.name for t in teachers]
    if given is not None:
        unknown = {lang: name for lang, name in given.items() if name not in names}
        if unknown:
            raise ValueError(f"language_teachers names unknown teachers {unknown}; teachers are {names}.")
        return dict(given)
    mapping: dict[str, str] = {}
    for teacher in teachers:
        for language in teacher.languages:
            if language in mapping:
                raise ValueError(
                    f"Language {language!r} is assigned to two teachers ({mapping[language]!r} and {teacher.name!r}); "
                    "give each language one teacher (or choose with select_teachers)."
                )
            mapping[language] = teacher.name
    if not mapping and len(teachers) > 1:
        raise ValueError(
            "No teacher has languages: give MaskedLMTeacher(..., languages=[...]), language_teachers=, or choose "
            "them with ki_trainer.merge_distill.select_teachers."
        )
    return mapping

def check_dataset(dataset, split: str, args: MergeDistillConfig, teachers: Sequence, language_teachers: dict) -> None:
    """A MergeDistill dataset checked before any work: text and language columns, every language covered by a
    teacher, unique ids for cached signals."""
    if dataset is None:
        return
    columns = column_names(dataset)
    if args.text_column not in columns:
        raise ValueError(f"The {split} dataset has no text column {args.text_column!r} (columns: {columns}).")
    several = len(teachers) > 1 or bool(language_teachers)
    if several:
        if args.language_column not in columns:
            raise ValueError(
                f"The {split} dataset has no language column {args.language_column!r} (columns: {columns}); with "
                f"several teachers each text needs a language, one of {sorted(language_teachers)}."
            )
        languages = column_values(dataset, args.language_column)
        for position, language in enumerate(languages):
            if language is None or language not in language_teachers:
                what = "has no language" if language is None else f"has language {language!r}, which has no teacher"
                raise ValueError(
                    f"Row {position} of the {split} dataset {what}; teachers cover {sorted(language_teachers)}."
                )
    if args.signals_are_cached and split == "train":
        if args.id_column not in columns:
            raise ValueError(
                f"Cached teacher signals need an example id column {args.id_column!r}; the {split} dataset has "
                f"{columns}. Add one (dataset.map(lambda r, i: {{'id': str(i)}}, with_indices=True)) or set id_column=."
            )
        ids = [str(x) for x in column_values(dataset, args.id_column)]
        if len(set(ids)) != len(ids):
            raise ValueError(f"Column {args.id_column!r} of the {split} dataset has duplicate ids.")

def teacher_max_length(teacher: MaskedLMTeacher, student, args: MergeDistillConfig) -> int:
    """The truncation length of one teacher's encoding: the smallest of every limit that applies."""
    limits = [
        args.max_length,
        teacher.max_length,
        teacher.position_limit(),
        model_position_limit(student.config),
        getattr(teacher.tokenizer, "model_max_length", None),
    ]
    return int(min(x for x in limits if x is not None and x < 1_000_000))

def student_max_length(student, args: MergeDistillConfig) -> int:
    """The student's truncation length: ``max_length`` within its position limit."""
    limits = [args.max_length, model_position_limit(student.config)]
    return int(min(x for x in limits if x is not None and x < 1_000_000))

def training_text_columns(vocabulary: StudentVocabulary, texts, max_length: int) -> torch.Tensor:
    """Sorted student ids that occur in ``texts`` (student tokenization, specials excluded)."""
    tokenizer = vocabulary.tokenizer
    seen: set[int] = set()
    texts = list(texts)
    for start in range(0, len(texts), 256):
        for ids in tokenizer(texts[start : start + 256], truncation=True, max_length=max_length)["input_ids"]:
            seen.update(ids)
    seen -= set(tokenizer.all_special_ids)
    seen.add(tokenizer.unk_token_id)  # never a target, but keeps the inverse map total for [UNK] inputs
    seen.discard(None)
    return torch.tensor(sorted(seen), dtype=torch.long)
