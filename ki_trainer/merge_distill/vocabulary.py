"""The student's vocabulary: the union of the teachers' vocabularies, per-teacher id maps, coverage.

Teachers tokenize with different sub-word conventions. WordPiece marks a CONTINUATION piece
(``"##ing"``; a bare piece starts a word); SentencePiece marks a WORD START (``"▁walk"``; a bare
piece continues a word). Both are normalised to ``(surface, starts_word)`` and written in one
convention in the student vocabulary: a word-start piece as its surface (``"walk"``), a
continuation piece with ``"##"`` (``"##ing"``). Special tokens are unified by ROLE (``<s>`` and
``[CLS]`` are the student's ``[CLS]``; ``</s>``/``[SEP]``; ``<pad>``/``[PAD]``; ``<unk>``/``[UNK]``;
``<mask>``/``[MASK]``).

Every teacher gets an id map ``teacher id -> student id`` (``-1`` where a token has no student
counterpart) and a coverage report (share of its vocabulary and of its token occurrences on given
text that map). Nothing is dropped silently: unmapped tokens are counted, and a student
tokenizer that covers almost nothing is an error.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_ROLES = ("pad", "unk", "cls", "sep", "mask")
STUDENT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
WORD_START = "\u2581"  # SentencePiece's "▁"
CONTINUATION = "##"


def tokenizer_convention(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """``("wordpiece", prefix)`` or ``("sentencepiece", "▁")``: how the tokenizer marks sub-words.

    Raises ValueError for conventions this module cannot normalise (e.g. byte-level BPE), naming
    the model type, so the user can pass a student tokenizer instead.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; MergeDistill reads the sub-word convention from "
            "the fast (tokenizers) backend. Load the teacher's tokenizer with use_fast=True."
        )
    model = backend.model
    kind = type(model).__name__
    if kind == "WordPiece":
        return "wordpiece", model.continuing_subword_prefix or CONTINUATION
    if kind == "WordLevel":
        return "wordpiece", CONTINUATION  # whole words: every token starts a word
    if kind == "Unigram" or (kind == "BPE" and "Metaspace" in json.dumps(json.loads(backend.to_str()).get("pre_tokenizer"))):
        return "sentencepiece", WORD_START
    raise ValueError(
        f"Cannot normalise the sub-word convention of {type(tokenizer).__name__} (backend model {kind!r}): "
        "MergeDistill supports WordPiece ('##' continuation) and SentencePiece ('▁' word start) teachers. "
        "Pass a student tokenizer whose tokens you map yourself."
    )


def normalize_token(token: str, convention: tuple[str, str]) -> str:
    """The token in the student's convention: word start -> surface, continuation -> ``"##" + surface``.

    Tokens that cannot be written that way (a bare ``"▁"``, a bare ``"##"``) keep their raw string so they
    still get a student id of their own.
    """
    kind, marker = convention
    if kind == "wordpiece":
        if token.startswith(marker) and len(token) > len(marker):
            return CONTINUATION + token[len(marker):]
        return token
    if token.startswith(marker):
        surface = token[len(marker):]
        return surface if surface else token
    return CONTINUATION + token


def special_roles(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """Teacher special-token id -> role (``bos`` counts as ``cls``, ``eos`` as ``sep``)."""
    roles: dict[int, str] = {}
    for role, attr in (("cls", "bos_token"), ("sep", "eos_token"), *((r, f"{r}_token") for r in SPECIAL_ROLES)):
        token = getattr(tokenizer, attr, None)
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id >= 0:
            roles[token_id] = role
    return roles


@dataclass
class TeacherCoverage:
    """How much of one teacher's vocabulary and text the student vocabulary covers."""

    teacher: str
    vocab_size: int
    vocab_mapped: int
    occurrences: int = 0
    occurrences_mapped: int = 0

    @property
    def vocab_share(self) -> float:
        return self.vocab_mapped / self.vocab_size if self.vocab_size else 0.0

    @property
    def occurrence_share(self) -> Optional[float]:
        return self.occurrences_mapped / self.occurrences if self.occurrences else None

    def as_dict(self) -> dict:
        return {
            "teacher": self.teacher,
            "vocab_size": self.vocab_size,
            "vocab_mapped": self.vocab_mapped,
            "vocab_share": round(self.vocab_share, 6),
            "occurrences": self.occurrences,
            "occurrences_mapped": self.occurrences_mapped,
            "occurrence_share": None if self.occurrence_share is None else round(self.occurrence_share, 6),
        }


@dataclass
class StudentVocabulary:
    """Student tokens, per-teacher id maps (``LongTensor``, -1 = unmapped) and coverage.

    Build it with :meth:`union` (the default: the union of the teachers' vocabularies) or
    :meth:`from_tokenizer` (a user-given student tokenizer). ``owners[s]`` lists the
    ``(teacher index, teacher id)`` pairs that map to student id ``s`` (for embedding initialisation).
    """

    tokens: list[str]
    teacher_names: list[str]
    id_maps: list[torch.Tensor]
    coverage: list[TeacherCoverage]
    special_ids: dict[str, int]
    tokenizer: Optional[PreTrainedTokenizerBase] = None
    owners: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    # ------------------------------------------------------------------ construction
    @classmethod
    def union(
        cls,
        tokenizers: Sequence[PreTrainedTokenizerBase],
        names: Optional[Sequence[str]] = None,
        token_counts: Optional[Sequence[Optional[Counter]]] = None,
        min_count: int = 1,
    ) -> "StudentVocabulary":
        """The union of the teachers' vocabularies in the student convention, specials first.

        Args:
            tokenizers: the teachers' (fast) tokenizers.
            names: teacher names for reports.
            token_counts: per teacher, a ``Counter`` of teacher token ids on the training text (see
                :func:`count_tokens`). When given, only tokens seen at least ``min_count`` times there
                enter the union (a small student keeps a small vocabulary); coverage of those
                occurrences is reported. ``None`` keeps every token of that teacher.
            min_count: see ``token_counts``.
        """
        names = list(names or [f"teacher_{i}" for i in range(len(tokenizers))])
        if len(names) != len(tokenizers):
            raise ValueError(f"{len(tokenizers)} tokenizers but {len(names)} names.")
        if not tokenizers:
            raise ValueError("A union vocabulary needs at least one teacher tokenizer.")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}.")
        token_counts = list(token_counts) if token_counts is not None else [None] * len(tokenizers)
        tokens = [STUDENT_SPECIALS[role] for role in SPECIAL_ROLES]
        index = {token: i for i, token in enumerate(tokens)}
        for tokenizer, counts in zip(tokenizers, token_counts):
            convention = tokenizer_convention(tokenizer)
            specials = special_roles(tokenizer)
            special_tokens = set(tokenizer.all_special_tokens)
            for teacher_id, token in _id_ordered(tokenizer):
                if teacher_id in specials or token in special_tokens:
                    continue
                if counts is not None and counts.get(teacher_id, 0) < min_count:
                    continue
                student_token = normalize_token(token, convention)
                if student_token not in index:
                    index[student_token] = len(tokens)
                    tokens.append(student_token)
        if len(tokens) == len(SPECIAL_ROLES) and any(counts is not None for counts in token_counts):
            raise ValueError(
                f"min_count={min_count} keeps no token: no teacher token occurs {min_count} times in the counted text, "
                "so the student vocabulary would hold only special tokens. Lower min_count (`vocabulary_min_count` of "
                "ki-trainer merge-distill; 0 keeps every token) or count on more text."
            )
        vocabulary = cls._mapped(tokens, tokenizers, names, token_counts)
        vocabulary.tokenizer = build_union_tokenizer(tokens)
        return vocabulary

    @classmethod
    def from_tokenizer(
        cls,
        student_tokenizer: PreTrainedTokenizerBase,
        tokenizers: Sequence[PreTrainedTokenizerBase],
        names: Optional[Sequence[str]] = None,
        token_counts: Optional[Sequence[Optional[Counter]]] = None,
        min_coverage: float = 0.5,
    ) -> "StudentVocabulary":
        """Map the teachers onto a user-given student tokenizer (its tokens, its convention).

        Raises ValueError (with the coverage report) when, for some teacher, less than ``min_coverage``
        of its token occurrences (of its vocabulary when no counts are given) has a student counterpart.
        """
        names = list(names or [f"teacher_{i}" for i in range(len(tokenizers))])
        convention = tokenizer_convention(student_tokenizer)
        tokens = [None] * len(student_tokenizer)
        for token, token_id in student_tokenizer.get_vocab().items():
            tokens[token_id] = token
        # Student tokens in the student convention ("##" continuation) so teacher tokens can be looked up.
        normalised = [normalize_token(t, convention) if t is not None else None for t in tokens]
        roles = {role: token_id for token_id, role in special_roles(student_tokenizer).items()}
        missing = [r for r in ("unk", "mask", "pad") if r not in roles]
        if missing:
            raise ValueError(f"The student tokenizer has no {', '.join(missing)} token; a masked-LM student needs them.")
        for role, token_id in roles.items():
            normalised[token_id] = STUDENT_SPECIALS[role]
        vocabulary = cls._mapped(
            normalised, tokenizers, names, list(token_counts) if token_counts is not None else [None] * len(tokenizers)
        )
        vocabulary.tokens = [t if t is not None else "" for t in tokens]
        vocabulary.special_ids = roles
        vocabulary.tokenizer = student_tokenizer
        low = [c for c in vocabulary.coverage if (c.occurrence_share if c.occurrences else c.vocab_share) < min_coverage]
        if low:
            report = "; ".join(
                f"{c.teacher}: vocabulary {c.vocab_share:.1%}"
                + (f", occurrences {c.occurrence_share:.1%}" if c.occurrences else "")
                for c in vocabulary.coverage
            )
            raise ValueError(
                f"The student tokenizer covers too little of teacher(s) {[c.teacher for c in low]} "
                f"(min_coverage={min_coverage:.0%}): {report}. Their texts would reach the student mostly as "
                "[UNK]. Use the union vocabulary (StudentVocabulary.union) or a student tokenizer that shares "
                "their vocabulary."
            )
        return vocabulary

    @classmethod
    def _mapped(cls, tokens, tokenizers, names, token_counts) -> "StudentVocabulary":
        index = {token: i for i, token in enumerate(tokens) if token is not None}
        special_ids = {role: index[STUDENT_SPECIALS[role]] for role in SPECIAL_ROLES if STUDENT_SPECIALS[role] in index}
        id_maps, coverage, owners = [], [], {}
        for t, (tokenizer, name, counts) in enumerate(zip(tokenizers, names, token_counts)):
            convention = tokenizer_convention(tokenizer)
            specials = special_roles(tokenizer)
            pairs = _id_ordered(tokenizer)
            size = max(len(tokenizer), 1 + max((i for i, _ in pairs), default=-1))
            values = [-1] * size
            for teacher_id, token in pairs:
                if teacher_id in specials:
                    student_id = special_ids.get(specials[teacher_id], -1)
                else:
                    student_id = index.get(normalize_token(token, convention), -1)
                values[teacher_id] = student_id
                if student_id >= 0:
                    owners.setdefault(student_id, []).append((t, teacher_id))
            id_map = torch.tensor(values, dtype=torch.long)
            report = TeacherCoverage(name, len(pairs), sum(values[i] >= 0 for i, _ in pairs))
            if counts is not None:
                report.occurrences = int(sum(counts.values()))
                report.occurrences_mapped = int(sum(c for i, c in counts.items() if i < size and id_map[i] >= 0))
            id_maps.append(id_map)
            coverage.append(report)
        return cls(list(tokens), list(names), id_maps, coverage, special_ids, owners=owners)

    # ------------------------------------------------------------------ use
    def map_ids(self, teacher: int, teacher_ids: torch.Tensor) -> torch.Tensor:
        """Teacher ids -> student ids; unmapped tokens become the student's ``[UNK]``."""
        id_map = self.id_maps[teacher].to(teacher_ids.device)
        mapped = id_map[teacher_ids.clamp(0, len(id_map) - 1)]
        return torch.where(mapped >= 0, mapped, torch.full_like(mapped, self.special_ids["unk"]))

    def mapped_teacher_ids(self, teacher: int) -> torch.Tensor:
        """The teacher ids that have a student counterpart (ascending)."""
        return torch.nonzero(self.id_maps[teacher] >= 0).flatten()

    def update_coverage(self, token_counts: Sequence[Optional[Counter]]) -> list[TeacherCoverage]:
        """Recompute occurrence coverage on other text (e.g. held-out rows); returns new reports."""
        reports = []
        for report, id_map, counts in zip(self.coverage, self.id_maps, token_counts):
            new = TeacherCoverage(report.teacher, report.vocab_size, report.vocab_mapped)
            if counts is not None:
                new.occurrences = int(sum(counts.values()))
                new.occurrences_mapped = int(sum(c for i, c in counts.items() if i < len(id_map) and id_map[i] >= 0))
            reports.append(new)
        return reports

    def coverage_table(self) -> list[dict]:
        return [c.as_dict() for c in self.coverage]

    def alignments_for(self, tokenizers: Sequence[PreTrainedTokenizerBase]) -> list:
        """One :class:`~ki_trainer.merge_distill.alignment.TeacherAlignment` per teacher tokenizer (cached)."""
        from .alignment import TeacherAlignment

        if self.tokenizer is None:
            raise ValueError("The student vocabulary has no tokenizer to align the teachers to.")
        cached = getattr(self, "_alignments", None)
        if cached is None or len(cached) != len(tokenizers) or any(a.teacher_tokenizer is not t for a, t in zip(cached, tokenizers)):
            cached = [TeacherAlignment(t, self.tokenizer) for t in tokenizers]
            self._alignments = cached
        return cached


def _id_ordered(tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, str]]:
    return sorted(((i, t) for t, i in tokenizer.get_vocab().items()), key=lambda pair: pair[0])


def count_tokens(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], max_length: Optional[int] = None) -> Counter:
    """Occurrences of each teacher token id in ``texts`` (special tokens excluded)."""
    counts: Counter = Counter()
    texts = list(texts)
    if not texts:
        return counts
    encoded = tokenizer(texts, add_special_tokens=False, truncation=max_length is not None, max_length=max_length)
    for ids in encoded["input_ids"]:
        counts.update(ids)
    return counts


def build_union_tokenizer(tokens: Sequence[str], model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A WordPiece ``PreTrainedTokenizerFast`` over the union tokens (saves/reloads with AutoTokenizer).

    For standalone use of the student (fill-mask, fine-tuning): it segments text by greedy longest
    match over the union, which can differ from how the teacher of a language segments it. Training
    inputs are the teachers' own segmentations mapped to student ids.
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix=CONTINUATION))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix=CONTINUATION)
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def choose_student_tokenizer(
    tokenizers: Sequence[PreTrainedTokenizerBase],
    texts: dict[str, Sequence[str]],
    names: Optional[Sequence[str]] = None,
) -> tuple[int, list[dict]]:
    """The teacher tokenizer that reads the text of ALL languages best: to be the student's own tokenizer.

    Per tokenizer and language, on ``texts`` (language -> texts): the share of whitespace words that
    contain ``[UNK]`` and the mean pieces per word. The choice minimises the worst language's ``[UNK]``
    share (rounded to 0.1%), then prefers a tokenizer that keeps case (an uncased one cannot give
    cased text back), then the fewest pieces per word over all languages. Returns ``(index, table)``.
    """
    from .alignment import lowercases

    if not tokenizers:
        raise ValueError("No tokenizers to choose the student's from.")
    names = list(names or [f"teacher_{i}" for i in range(len(tokenizers))])
    table, keys = [], []
    for i, (tokenizer, name) in enumerate(zip(tokenizers, names)):
        tokenizer_convention(tokenizer)  # a convention this module can align, else a clear error
        worst_unknown, pieces, words_total = 0.0, 0, 0
        for language, rows in texts.items():
            words = unknown = count = 0
            for text in rows:
                for word in text.split():
                    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
                    words += 1
                    count += len(ids)
                    unknown += tokenizer.unk_token_id in ids
            share = unknown / words if words else 0.0
            worst_unknown = max(worst_unknown, share)
            pieces += count
            words_total += words
            table.append({"tokenizer": name, "language": language, "words": words, "unknown_word_share": round(share, 5),
                          "pieces_per_word": round(count / words, 4) if words else None})
        keys.append((round(worst_unknown, 3), lowercases(tokenizer), pieces / max(1, words_total)))
    best = min(range(len(tokenizers)), key=lambda i: keys[i])
    for row in table:
        row["chosen"] = row["tokenizer"] == names[best]
    return best, table
