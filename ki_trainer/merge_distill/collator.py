"""Raw text + language -> the student's masked tokens and the aligned teacher inputs.

Every row is tokenized by the STUDENT's tokenizer (the one saved with the student, so inference reads
text exactly as training did) and masked in the student's token space (15%, 80/10/10). The teacher of
the row's language gets the same text in its own tokenization with every token that overlaps a
masked student token masked; the student positions whose span equals one teacher token's span
(:class:`~ki_trainer.merge_distill.alignment.TeacherAlignment`) receive that teacher's top-k signal,
the others only the masked-LM loss. The batch holds the student's inputs and gold labels (student ids
at the predicted positions, -100 elsewhere), a mask of the positions that have a teacher signal, one
sub-batch per teacher (its rows, its masked ids, the teacher positions to predict in the same order
and the student token's form there) and, for cached signals, the example ids.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .alignment import case_pattern
from .masking import example_generator, mask_tokens
from .teacher import MaskedLMTeacher
from .vocabulary import StudentVocabulary

TEACHER_BATCHES_KEY = "md_teacher_batches"
EXAMPLE_IDS_KEY = "md_example_ids"
KD_POSITIONS_KEY = "md_kd_positions"


def _trimmed(text: str, offsets) -> list[tuple[int, int]]:
    """Character spans without leading/trailing whitespace (some tokenizers count the space before a
    word-start piece into its span, others do not)."""
    out = []
    for start, end in offsets:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        out.append((int(start), int(end)))
    return out


class MergeDistillCollator:
    """Collates rows ``{text, language[, id]}`` for :class:`MergeDistillTrainer`.

    Args:
        teachers: the masked-LM teachers.
        vocabulary: the student vocabulary; ``vocabulary.tokenizer`` segments every text and
            ``vocabulary.alignments`` relate each teacher to it.
        language_teachers: language -> teacher index.
        max_lengths: per teacher, truncation length (teacher tokens, specials included).
        mlm_probability: share of eligible tokens to predict.
        seed: masking seed.
        static_masking: mask each row as a function of ``(seed, example key)`` (its id, else its
            text), identically every epoch; otherwise masks are drawn fresh from a seeded generator.
        text_column, language_column, id_column: dataset columns.
        student_max_length: truncation length of the student's tokenization (specials included).
        replacement_ids: student ids random replacements are drawn from (default: every non-special id).
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
        student_max_length: Optional[int] = None,
        replacement_ids: Optional[torch.Tensor] = None,
    ) -> None:
        self.teachers = list(teachers)
        self.vocabulary = vocabulary
        self.tokenizer = vocabulary.tokenizer
        if self.tokenizer is None:
            raise ValueError("The student vocabulary has no tokenizer; MergeDistill segments every text with it.")
        self.alignments = vocabulary.alignments_for([t.tokenizer for t in self.teachers])
        self.language_teachers = dict(language_teachers)
        self.max_lengths = list(max_lengths)
        self.student_max_length = student_max_length or min(self.max_lengths)
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.static_masking = static_masking
        self.text_column = text_column
        self.language_column = language_column
        self.id_column = id_column
        self.emit_ids = emit_ids
        self.generator = torch.Generator().manual_seed(seed)
        specials = set(self.tokenizer.all_special_ids)
        self._special = torch.zeros(len(vocabulary), dtype=torch.bool)
        self._special[[i for i in specials if i < len(vocabulary)]] = True
        if replacement_ids is None:
            replacement_ids = torch.nonzero(~self._special).flatten()
        self.replacements = replacement_ids
        self._tokens = {}

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

    def _token(self, student_id: int) -> str:
        token = self._tokens.get(student_id)
        if token is None:
            token = self._tokens[student_id] = self.tokenizer.convert_ids_to_tokens(int(student_id))
        return token

    def encode_row(self, row: dict, teacher_index: int) -> dict:
        """One row: student ids (original and masked), predict mask, and the teacher's aligned inputs."""
        text = row[self.text_column]
        enc = self.tokenizer(
            text, truncation=True, max_length=self.student_max_length, return_offsets_mapping=True
        )
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        offsets = _trimmed(text, enc["offset_mapping"])
        special = self._special[ids.clamp(max=len(self._special) - 1)] | (ids >= len(self._special))
        eligible = ~special & (ids != self.tokenizer.unk_token_id)
        generator = example_generator(self.seed, self.example_key(row)) if self.static_masking else self.generator
        masked, predict = mask_tokens(
            ids[None], eligible[None], self.tokenizer.mask_token_id, self.replacements, self.mlm_probability, generator
        )
        masked, predict = masked[0], predict[0]
        alignment = self.alignments[teacher_index]
        if alignment.identical:
            teacher_ids, teacher_masked, teacher_predict = ids, masked, predict.clone()
            kd = predict.clone()
            forms = torch.zeros((int(predict.sum()), 2), dtype=torch.long)
        else:
            teacher = self.teachers[teacher_index]
            end = max((b for (a, b), s in zip(offsets, special.tolist()) if not s), default=0)
            tenc = teacher.tokenizer(
                text[:end], truncation=True, max_length=self.max_lengths[teacher_index], return_offsets_mapping=True
            )
            teacher_ids = torch.tensor(tenc["input_ids"], dtype=torch.long)
            toffsets = _trimmed(text, tenc["offset_mapping"])
            tspecial = [i in set(teacher.tokenizer.all_special_ids) for i in tenc["input_ids"]]
            pairs = alignment.align(offsets, special.tolist(), toffsets, tspecial)
            teacher_masked = teacher_ids.clone()
            teacher_predict = torch.zeros(len(teacher_ids), dtype=torch.bool)
            kd = torch.zeros(len(ids), dtype=torch.bool)
            forms_list, last = [], -1
            for p in torch.nonzero(predict).flatten().tolist():
                for j in alignment.overlapping(toffsets, offsets[p]):
                    if not tspecial[j]:
                        teacher_masked[j] = teacher.tokenizer.mask_token_id
                j = pairs.get(p)
                if j is not None and j > last:
                    kd[p], teacher_predict[j], last = True, True, j
                    start, stop = offsets[p]
                    forms_list.append((int(alignment.word_start(self._token(int(ids[p])))), case_pattern(text[start:stop])))
            forms = torch.tensor(forms_list, dtype=torch.long).reshape(-1, 2)
        return {"ids": ids, "masked": masked, "predict": predict, "kd": kd, "teacher_ids": teacher_ids,
                "teacher_masked": teacher_masked, "teacher_predict": teacher_predict, "forms": forms}

    # ------------------------------------------------------------------ batch
    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        vocabulary = self.vocabulary
        encoded = []
        for position, row in enumerate(rows):
            t = self.teacher_of(row, position)
            encoded.append((t, self.encode_row(row, t)))
        length = max(len(e["ids"]) for _, e in encoded)
        n = len(rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else vocabulary.special_ids["pad"]
        input_ids = torch.full((n, length), pad_id, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        kd = torch.zeros((n, length), dtype=torch.bool)
        teacher_batches: dict[int, dict[str, torch.Tensor]] = {}
        for i, (t, e) in enumerate(encoded):
            size = len(e["ids"])
            input_ids[i, :size] = e["masked"]
            attention[i, :size] = 1
            labels[i, :size] = torch.where(e["predict"], e["ids"], torch.full_like(e["ids"], -100))
            kd[i, :size] = e["kd"]
        for t in sorted({e[0] for e in encoded}):
            members = [i for i, e in enumerate(encoded) if e[0] == t]
            width = max(len(encoded[i][1]["teacher_ids"]) for i in members)
            pad = self.teachers[t].tokenizer.pad_token_id or 0
            ids = torch.full((len(members), width), pad, dtype=torch.long)
            mask = torch.zeros((len(members), width), dtype=torch.long)
            predict = torch.zeros((len(members), width), dtype=torch.bool)
            for j, i in enumerate(members):
                e = encoded[i][1]
                size = len(e["teacher_ids"])
                ids[j, :size], mask[j, :size], predict[j, :size] = e["teacher_masked"], 1, e["teacher_predict"]
            teacher_batches[t] = {
                "rows": torch.tensor(members, dtype=torch.long),
                "input_ids": ids,
                "attention_mask": mask,
                "predict": predict,
                "forms": torch.cat([encoded[i][1]["forms"] for i in members]),
            }
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels, KD_POSITIONS_KEY: kd,
                 TEACHER_BATCHES_KEY: teacher_batches}
        if self.emit_ids:
            batch[EXAMPLE_IDS_KEY] = [self.example_key(row) for row in rows]
        return batch
