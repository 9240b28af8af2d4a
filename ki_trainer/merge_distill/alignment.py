"""The student reads every language with ITS OWN tokenizer; teacher signals are aligned to it.

Training on the student tokenizer's segmentation is what makes the saved student read text at
inference exactly as it was trained (the tokenizer saved with it IS the training tokenizer). A
teacher whose tokenizer differs is aligned through the fast tokenizers' character offsets:

- a student position is *aligned* when its character span equals exactly the span of ONE teacher
  token (and that teacher token's span equals no other student token's); the teacher predicts that
  token, and its top-k candidates are written in the student's vocabulary by their string form;
- unaligned masked positions are trained by the masked-LM loss alone (the teacher's tokens that
  overlap them are masked too, so the teacher never sees what the student must predict).

String form: a teacher candidate is reduced to its surface (WordPiece ``"##x"`` -> ``"x"``,
SentencePiece ``"▁x"`` -> ``"x"``) and re-written in the form of the student's token at that
position (word start or continuation: ``"▁x"``/``"x"`` for a SentencePiece student, ``"x"``/``"##x"``
for a WordPiece one). For an uncased teacher the original text's case pattern (lower, Title, UPPER)
is restored before lookup. Candidates without a student token are dropped and the rest renormalised.

A teacher whose tokenizer is the student's (same vocabulary and segmentation) is aligned at every
position, and its token ids are the student's.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .vocabulary import CONTINUATION, WORD_START, tokenizer_convention

# case codes of an aligned position (how to restore an uncased teacher's candidate)
CASE_KEEP, CASE_LOWER, CASE_TITLE, CASE_UPPER = 0, 1, 2, 3


def _segmentation_json(tokenizer: PreTrainedTokenizerBase) -> str:
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    return json.dumps({k: state.get(k) for k in ("normalizer", "pre_tokenizer", "model")}, sort_keys=True)


def lowercases(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer's normalizer lowercases its input (an uncased teacher)."""
    normalizer = tokenizer.backend_tokenizer.normalizer
    if normalizer is None:
        return False
    return normalizer.normalize_str("AbC") == "abc"


def case_pattern(surface: str) -> int:
    """How ``surface`` (the original text of a span) is cased: lower, Title, UPPER or other (keep)."""
    letters = [c for c in surface if c.isalpha()]
    if not letters or all(c.islower() for c in letters if c.lower() != c.upper()):
        return CASE_LOWER
    if len(letters) > 1 and all(c.isupper() for c in letters if c.lower() != c.upper()):
        return CASE_UPPER
    if letters[0].isupper() and all(c.islower() for c in letters[1:] if c.lower() != c.upper()):
        return CASE_TITLE
    return CASE_KEEP


def apply_case(surface: str, case: int) -> str:
    if case == CASE_UPPER:
        return surface.upper()
    if case == CASE_TITLE:
        return surface[:1].upper() + surface[1:]
    return surface


class TeacherAlignment:
    """How one teacher's tokens relate to the student tokenizer's (see the module docstring).

    Args:
        teacher_tokenizer: the teacher's fast tokenizer.
        student_tokenizer: the student's fast tokenizer (the one saved with the student).
    """

    def __init__(self, teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase) -> None:
        for role, tok in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
            if not getattr(tok, "is_fast", False):
                raise ValueError(
                    f"The {role} tokenizer ({type(tok).__name__}) is not a fast tokenizer; alignment needs character "
                    "offsets (load it with use_fast=True)."
                )
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.student_vocab = student_tokenizer.get_vocab()
        self.identical = self.student_vocab == teacher_tokenizer.get_vocab() and _segmentation_json(
            teacher_tokenizer
        ) == _segmentation_json(student_tokenizer)
        self.teacher_convention = tokenizer_convention(teacher_tokenizer)
        self.student_convention = tokenizer_convention(student_tokenizer)
        self.student_specials = set(student_tokenizer.all_special_ids)
        self.uncased = lowercases(teacher_tokenizer) and not lowercases(student_tokenizer)
        specials = set(teacher_tokenizer.all_special_ids)
        size = max(len(teacher_tokenizer), 1 + max(teacher_tokenizer.get_vocab().values()))
        self.surfaces: list[Optional[str]] = [None] * size
        kind, marker = self.teacher_convention
        for token, i in teacher_tokenizer.get_vocab().items():
            if i in specials:
                continue
            if kind == "wordpiece":
                surface = token[len(marker):] if token.startswith(marker) and len(token) > len(marker) else token
            else:
                surface = token[len(marker):] if token.startswith(marker) else token
            self.surfaces[i] = surface or None
        self._cache: dict[tuple[int, int, int], int] = {}

    # ------------------------------------------------------------------ candidates
    def student_form(self, surface: str, word_start: bool) -> str:
        kind, marker = self.student_convention
        if kind == "wordpiece":
            return surface if word_start else CONTINUATION + surface
        return (WORD_START + surface) if word_start else surface

    def student_id(self, teacher_id: int, word_start: bool, case: int) -> int:
        """The student id of teacher token ``teacher_id`` written as at an aligned position (-1: none)."""
        if self.identical:
            return int(teacher_id)
        key = (int(teacher_id), bool(word_start), int(case))
        found = self._cache.get(key)
        if found is None:
            surface = self.surfaces[teacher_id] if 0 <= teacher_id < len(self.surfaces) else None
            found = -1
            if surface is not None:
                if self.uncased:
                    surface = apply_case(surface, case)
                found = self.student_vocab.get(self.student_form(surface, word_start), -1)
                if found in self.student_specials:
                    found = -1
            self._cache[key] = found
        return found

    def mappable_teacher_ids(self) -> torch.Tensor:
        """Teacher ids that have a student token in some form (ascending): the candidates worth scoring."""
        if self.identical:
            return torch.arange(len(self.student_vocab))
        keep = [
            i for i, s in enumerate(self.surfaces)
            if s is not None and any(self.student_id(i, ws, c) >= 0 for ws in (True, False) for c in (CASE_LOWER, CASE_TITLE))
        ]
        return torch.tensor(keep, dtype=torch.long)

    def map_topk(self, top_ids: torch.Tensor, top_probs: torch.Tensor, forms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher top-k ``(n, k)`` -> student ids ``(n, k)``, renormalised probabilities and kept mass ``(n,)``.

        ``forms`` ``(n, 2)``: per position, word start (0/1) and case code of the student's token there.
        Candidates without a student token get probability 0; the rest is renormalised (a row of zeros
        when nothing maps).
        """
        ids_list = top_ids.tolist()
        forms_list = forms.tolist()
        mapped = torch.tensor(
            [[self.student_id(i, ws, case) for i in row] for row, (ws, case) in zip(ids_list, forms_list)],
            dtype=torch.long,
        ).reshape(top_ids.shape)
        keep = mapped >= 0
        probs = top_probs.float() * keep.to(top_probs.device)
        kept = probs.sum(dim=-1)
        renormalised = torch.where(kept[:, None] > 0, probs / kept.clamp_min(1e-30)[:, None], torch.zeros_like(probs))
        return mapped.clamp_min(0).to(top_ids.device), renormalised, kept

    # ------------------------------------------------------------------ positions
    def word_start(self, student_token: str) -> bool:
        kind, marker = self.student_convention
        if kind == "wordpiece":
            return not student_token.startswith(marker)
        return student_token.startswith(WORD_START)

    def align(
        self,
        student_offsets: Sequence[tuple[int, int]],
        student_special: Sequence[bool],
        teacher_offsets: Sequence[tuple[int, int]],
        teacher_special: Sequence[bool],
    ) -> dict[int, int]:
        """Student position -> teacher position where both spans are equal, non-empty and unique."""
        def spans(offsets, special):
            out: dict[tuple[int, int], int] = {}
            duplicate = set()
            for position, ((start, end), is_special) in enumerate(zip(offsets, special)):
                if is_special or end <= start:
                    continue
                key = (int(start), int(end))
                if key in out:
                    duplicate.add(key)
                out[key] = position
            for key in duplicate:
                del out[key]
            return out

        student_spans, teacher_spans = spans(student_offsets, student_special), spans(teacher_offsets, teacher_special)
        return {position: teacher_spans[key] for key, position in student_spans.items() if key in teacher_spans}

    def overlapping(self, teacher_offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> list[int]:
        start, end = span
        return [j for j, (a, b) in enumerate(teacher_offsets) if b > a and a < end and b > start]


def segmentation_agreement(
    saved_tokenizer: PreTrainedTokenizerBase,
    trained_with: PreTrainedTokenizerBase,
    texts: Sequence[str],
    teacher_tokenizer: Optional[PreTrainedTokenizerBase] = None,
) -> dict:
    """How the saved student tokenizer reads ``texts`` compared with the tokenizer it was trained with.

    Per whitespace-delimited word: ``same_segmentation`` is the share of words split into the same pieces
    by ``saved_tokenizer`` (e.g. reloaded from the student's directory) and ``trained_with`` (the tokenizer
    the training inputs were made with); ``unknown_words`` counts words where the saved tokenizer yields
    ``[UNK]`` but ``teacher_tokenizer`` (the language's teacher; default ``trained_with``) reads them
    without one.
    """
    teacher_tokenizer = teacher_tokenizer or trained_with
    words = same = unknown_new = 0
    for text in texts:
        pieces = [
            _pieces_per_word(text, enc["input_ids"], enc["offset_mapping"])
            for enc in (tok(text, add_special_tokens=False, return_offsets_mapping=True)
                        for tok in (saved_tokenizer, trained_with, teacher_tokenizer))
        ]
        for word, reference in pieces[1].items():
            words += 1
            mine = pieces[0].get(word, [])
            same += saved_tokenizer.convert_ids_to_tokens(mine) == trained_with.convert_ids_to_tokens(reference)
            teacher_unknown = teacher_tokenizer.unk_token_id in pieces[2].get(word, [])
            unknown_new += saved_tokenizer.unk_token_id in mine and not teacher_unknown
    return {
        "words": words,
        "same_segmentation": same / words if words else float("nan"),
        "unknown_words": unknown_new,
        "unknown_word_share": unknown_new / words if words else float("nan"),
    }


def _pieces_per_word(text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """Word span (whitespace-delimited) -> the token ids whose offsets start inside it."""
    bounds, start = [], None
    for i, ch in enumerate(text + " "):
        if ch.isspace():
            if start is not None:
                bounds.append((start, i))
                start = None
        elif start is None:
            start = i
    out: dict[tuple[int, int], list[int]] = {b: [] for b in bounds}
    k = 0
    for token_id, (a, b) in zip(ids, offsets):
        if b <= a:
            a = min(a, len(text))
        while k < len(bounds) and bounds[k][1] <= a:
            k += 1
        if k < len(bounds) and bounds[k][0] <= a < bounds[k][1]:
            out[bounds[k]].append(token_id)
        elif k < len(bounds) and a < bounds[k][0] and b > a:  # a piece starting on whitespace ("▁" offsets)
            out[bounds[k]].append(token_id)
    return out
