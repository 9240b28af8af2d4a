"""A fresh student masked LM over the student vocabulary, its embeddings seeded from the teachers."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import BertConfig, BertForMaskedLM

from .teacher import MaskedLMTeacher
from .vocabulary import StudentVocabulary


def init_student_embeddings(student, vocabulary: StudentVocabulary, teachers: Sequence[MaskedLMTeacher]) -> int:
    """Set each student token's input embedding to the mean of the embeddings of the teacher tokens that
    map to it (the teacher that owns it; averaged where several do). Returns how many rows were set.

    Raises ValueError if a teacher's embedding width differs from the student's (pass
    ``init_embeddings=False`` to :func:`build_student`, or give the student that hidden size).
    """
    target = student.get_input_embeddings().weight
    sums = torch.zeros_like(target, dtype=torch.float32)
    counts = torch.zeros(len(target), dtype=torch.float32)
    for t, teacher in enumerate(teachers):
        source = teacher.model.get_input_embeddings().weight
        if source.shape[1] != target.shape[1]:
            raise ValueError(
                f"Teacher {teacher.name!r} embeds tokens in {source.shape[1]} dimensions, the student in "
                f"{target.shape[1]}: its embeddings cannot initialise the student's. Use init_embeddings=False or "
                "a student of that hidden size."
            )
        pairs = [(s, i) for s, owners in vocabulary.owners.items() for (owner, i) in owners if owner == t and i < len(source)]
        if not pairs:
            continue
        student_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long)
        teacher_ids = torch.tensor([i for _, i in pairs], dtype=torch.long)
        sums.index_add_(0, student_ids, source.detach().float().cpu()[teacher_ids].to(sums.device))
        counts.index_add_(0, student_ids, torch.ones(len(pairs)))
    owned = counts > 0
    with torch.no_grad():
        target[owned] = (sums[owned] / counts[owned, None]).to(target.dtype)
    return int(owned.sum())


def build_student(
    vocabulary: StudentVocabulary,
    teachers: Optional[Sequence[MaskedLMTeacher]] = None,
    *,
    hidden_size: int = 384,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 6,
    intermediate_size: Optional[int] = None,
    max_position_embeddings: int = 512,
    init_embeddings: bool = True,
    seed: int = 0,
    **config_overrides,
) -> BertForMaskedLM:
    """A ``BertForMaskedLM`` (decoder tied to the input embeddings) over ``vocabulary``.

    With ``init_embeddings`` and teachers given, the word embeddings come from the teachers
    (:func:`init_student_embeddings`); everything else is freshly initialised from ``seed``.
    """
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocabulary),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=vocabulary.special_ids["pad"],
        tie_word_embeddings=True,
        **config_overrides,
    )
    student = BertForMaskedLM(config)
    if init_embeddings and teachers:
        init_student_embeddings(student, vocabulary, teachers)
    return student
