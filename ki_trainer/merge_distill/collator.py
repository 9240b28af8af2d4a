"""Raw text + language -> the teacher's masked tokens and the aligned student inputs.

Each row is tokenized by the teacher of its language, masked in that teacher's token space, and
mapped to student ids. The batch holds the student's inputs and gold labels (student ids at the
predicted positions, -100 elsewhere), one sub-batch per teacher (its rows, their masked teacher
ids) and, for cached signals, the example ids.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .masking import example_generator, mask_tokens
from .teacher import MaskedLMTeacher
from .vocabulary import StudentVocabulary

TEACHER_BATCHES_KEY = "md_teacher_batches"
EXAMPLE_IDS_KEY = "md_example_ids"


class MergeDistillCollator:
    """Collates rows ``{text, language[, id]}`` for :class:`MergeDistillTrainer`.

    Args:
        teachers: the masked-LM teachers.
        vocabulary: the student vocabulary with one id map per teacher (same order as ``teachers``).
        language_teachers: language -> teacher index.
        max_lengths: per teacher, truncation length (teacher tokens, specials included).
        mlm_probability: share of eligible tokens to predict.
        seed: masking seed.
        static_masking: mask each row as a function of ``(seed, example key)`` (its id, else its
            text), identically every epoch; otherwise masks are drawn fresh from a seeded generator.
        text_column, language_column, id_column: dataset columns.
    """

    def __init__(
        self,
        teachers: Sequence[MaskedLMTeacher],
        vocabulary: StudentVocabulary,
        language_teachers: dict[str, int],
        max_lengths: Sequence[int],
        mlm_probability: float = 0.15,
        seed: int = 0,
        static_masking: bool = False,
        text_column: str = "text",
        language_column: str = "language",
        id_column: Optional[str] = "id",
        emit_ids: bool = False,
    ) -> None:
        self.teachers = list(teachers)
        self.vocabulary = vocabulary
        self.language_teachers = dict(language_teachers)
        self.max_lengths = list(max_lengths)
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.static_masking = static_masking
        self.text_column = text_column
        self.language_column = language_column
        self.id_column = id_column
        self.emit_ids = emit_ids
        self.generator = torch.Generator().manual_seed(seed)
        self._replacements = []
        self._specials = []
        for t, teacher in enumerate(self.teachers):
            id_map = vocabulary.id_maps[t]
            special = torch.zeros(len(id_map), dtype=torch.bool)
            special[[i for i in teacher.tokenizer.all_special_ids if i < len(id_map)]] = True
            self._specials.append(special)
            self._replacements.append(torch.nonzero((id_map >= 0) & ~special).flatten())

    # ------------------------------------------------------------------ per row
    def teacher_of(self, row: dict, position: int) -> int:
        language = row.get(self.language_column)
        if language is None:
            if len(self.teachers) == 1 and not self.language_teachers:
                return 0
            where = f"row {row.get(self.id_column, position)!r}" if self.id_column else f"row {position}"
            raise ValueError(
                f"{where} has no language ({self.language_column!r}); with several teachers every text needs "
                f"one of {sorted(self.language_teachers)}."
            )
        if language not in self.language_teachers:
            raise ValueError(
                f"Language {language!r} (row {row.get(self.id_column, position)!r}) has no teacher; teachers cover "
                f"{sorted(self.language_teachers)}."
            )
        return self.language_teachers[language]

    def example_key(self, row: dict) -> str:
        if self.id_column and row.get(self.id_column) is not None:
            return str(row[self.id_column])
        return row[self.text_column]

    def encode_row(self, row: dict, teacher_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked teacher ids and the predict mask of one row (1-D each)."""
        teacher = self.teachers[teacher_index]
        ids = teacher.tokenizer(
            row[self.text_column], truncation=True, max_length=self.max_lengths[teacher_index]
        )["input_ids"]
        ids = torch.tensor(ids, dtype=torch.long)
        id_map, special = self.vocabulary.id_maps[teacher_index], self._specials[teacher_index]
        inside = ids < len(id_map)
        safe = ids.clamp(max=len(id_map) - 1)
        eligible = inside & (id_map[safe] >= 0) & ~special[safe]
        generator = example_generator(self.seed, self.example_key(row)) if self.static_masking else self.generator
        masked, predict = mask_tokens(
            ids[None],
            eligible[None],
            teacher.tokenizer.mask_token_id,
            self._replacements[teacher_index],
            self.mlm_probability,
            generator,
        )
        return ids, masked[0], predict[0]

    # ------------------------------------------------------------------ batch
    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        vocabulary = self.vocabulary
        encoded = []
        for position, row in enumerate(rows):
            t = self.teacher_of(row, position)
            original, masked, predict = self.encode_row(row, t)
            encoded.append((t, original, masked, predict))
        length = max(len(e[1]) for e in encoded)
        n = len(rows)
        input_ids = torch.full((n, length), vocabulary.special_ids["pad"], dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        teacher_batches: dict[int, dict[str, torch.Tensor]] = {}
        for i, (t, original, masked, predict) in enumerate(encoded):
            size = len(original)
            input_ids[i, :size] = vocabulary.map_ids(t, masked)
            attention[i, :size] = 1
            gold = vocabulary.map_ids(t, original)
            labels[i, :size] = torch.where(predict, gold, torch.full_like(gold, -100))
        for t in sorted({e[0] for e in encoded}):
            members = [i for i, e in enumerate(encoded) if e[0] == t]
            width = max(len(encoded[i][1]) for i in members)
            pad = self.teachers[t].tokenizer.pad_token_id or 0
            ids = torch.full((len(members), width), pad, dtype=torch.long)
            mask = torch.zeros((len(members), width), dtype=torch.long)
            predict = torch.zeros((len(members), width), dtype=torch.bool)
            for j, i in enumerate(members):
                size = len(encoded[i][1])
                ids[j, :size], mask[j, :size], predict[j, :size] = encoded[i][2], 1, encoded[i][3]
            teacher_batches[t] = {
                "rows": torch.tensor(members, dtype=torch.long),
                "input_ids": ids,
                "attention_mask": mask,
                "predict": predict,
            }
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels, TEACHER_BATCHES_KEY: teacher_batches}
        if self.emit_ids:
            batch[EXAMPLE_IDS_KEY] = [self.example_key(row) for row in rows]
        return batch
