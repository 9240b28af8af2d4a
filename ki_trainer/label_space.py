"""The union label space of a teacher ensemble.

Teachers are matched by label NAME, never by position: teacher A's ``"games"`` and teacher B's
``"games"`` are the same union class even when they sit at different indices. This is what lets
overlapping label sets (a class owned by several teachers) work, and what the reference code got
wrong by assuming contiguous blocks.
"""

from __future__ import annotations

import unicodedata
from typing import Iterable, Optional, Sequence

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def label_key(label: str) -> str:
    """What a person reads in a label name: Unicode compatibility form (NFKC: composed accents, ASCII for
    full-width letters), no invisible format characters (zero-width space, joiners, BOM, soft hyphen),
    whitespace collapsed, case folded. Two labels with one key look the same but are different strings."""
    text = unicodedata.normalize("NFKC", str(label))
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return " ".join(text.split()).casefold()


class LabelSpace:
    """Union of the teachers' label names with per-teacher index maps.

    Args:
        teacher_labels: one sequence of label names per teacher, in each teacher's own index order.
        teacher_names: optional names used in error messages and logs.
        labels: optional explicit union order. It must contain exactly the union of the teachers'
            labels. By default the union is ordered by first appearance (teacher 0's labels in its
            index order, then teacher 1's new labels, ...), which is deterministic for a fixed
            teacher list.

    Example:
        >>> space = LabelSpace([["a", "b"], ["b", "c"]])
        >>> space.labels
        ['a', 'b', 'c']
        >>> space.teacher_to_union(1).tolist()
        [1, 2]
    """

    def __init__(
        self,
        teacher_labels: Sequence[Sequence[str]],
        teacher_names: Optional[Sequence[str]] = None,
        labels: Optional[Sequence[str]] = None,
    ) -> None:
        if len(teacher_labels) == 0:
            raise ValueError("LabelSpace needs at least one teacher label set; got none.")
        names = list(teacher_names) if teacher_names is not None else [f"teacher_{i}" for i in range(len(teacher_labels))]
        if len(names) != len(teacher_labels):
            raise ValueError(f"Got {len(names)} teacher names for {len(teacher_labels)} label sets.")
        self.teacher_names: list[str] = names
        self.teacher_labels: list[list[str]] = []
        for name, own in zip(names, teacher_labels):
            own = [str(label) for label in own]
            if len(own) < 2:
                raise ValueError(
                    f"Teacher {name!r} has {len(own)} label(s) {own}; a teacher needs at least 2 classes "
                    "(its certainty is its normalised entropy, undefined for one class)."
                )
            duplicates = sorted({label for label in own if own.count(label) > 1})
            if duplicates:
                raise ValueError(f"Teacher {name!r} lists label(s) {duplicates} more than once.")
            self.teacher_labels.append(own)

        first_seen = list(dict.fromkeys(label for own in self.teacher_labels for label in own))
        if labels is None:
            self.labels: list[str] = first_seen
        else:
            labels = [str(label) for label in labels]
            if sorted(labels) != sorted(first_seen):
                missing = sorted(set(first_seen) - set(labels))
                extra = sorted(set(labels) - set(first_seen))
                raise ValueError(
                    "The explicit label order must contain exactly the union of the teachers' labels; "
                    f"missing {missing}, not owned by any teacher {extra}."
                )
            self.labels = labels
        variants: dict[str, list[str]] = {}
        for label in self.labels:
            variants.setdefault(label_key(label), []).append(label)
        for group in (g for g in variants.values() if len(g) > 1):
            logger.warning(
                f"Labels {[ascii(label) for label in group]} differ only by case or whitespace or by their Unicode "
                "form (NFC/NFD, full-width, invisible characters); they are DIFFERENT union classes. If they mean the "
                "same class, rename them (Teacher(..., labels=[...])) so the teachers agree."
            )
        self._by_key = {key: group for key, group in variants.items()}
        self.label2id: dict[str, int] = {label: i for i, label in enumerate(self.labels)}
        self.id2label: dict[int, str] = dict(enumerate(self.labels))
        self._teacher_index = [
            torch.tensor([self.label2id[label] for label in own], dtype=torch.long) for own in self.teacher_labels
        ]

    # ------------------------------------------------------------------ queries
    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def num_teachers(self) -> int:
        return len(self.teacher_labels)

    def teacher_to_union(self, teacher: int) -> torch.Tensor:
        """Union ids of teacher ``teacher``'s classes, in the teacher's own index order."""
        return self._teacher_index[teacher]

    def owners(self, label: str) -> list[int]:
        """Indices of the teachers that know ``label``."""
        return [t for t, own in enumerate(self.teacher_labels) if label in own]

    def ownership(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """Bool matrix ``[num_teachers, num_labels]``: does teacher t own union class c."""
        matrix = torch.zeros(self.num_teachers, self.num_labels, dtype=torch.bool)
        for t, index in enumerate(self._teacher_index):
            matrix[t, index] = True
        return matrix.to(device) if device is not None else matrix

    def pad(self, probs: torch.Tensor, teacher: int) -> torch.Tensor:
        """Scatter a teacher's ``[B, C_t]`` probabilities into the ``[B, C]`` union space (zeros elsewhere)."""
        index = self._teacher_index[teacher].to(probs.device)
        out = probs.new_zeros(probs.shape[0], self.num_labels)
        return out.index_add_(1, index, probs)

    def encode(self, labels: Iterable) -> list[int]:
        """Map gold labels (union names or union ids) to union ids, with a clear error for strangers."""
        ids = []
        for label in labels:
            if isinstance(label, str):
                if label not in self.label2id:
                    near = self._by_key.get(label_key(label), [])
                    hint = f" It differs only in case, whitespace or Unicode form from {[ascii(n) for n in near]}." if near else ""
                    raise ValueError(
                        f"Gold label {ascii(label)} is not owned by any teacher; the union labels are {self.labels}.{hint}"
                    )
                ids.append(self.label2id[label])
            else:
                try:
                    value = int(label)
                except (TypeError, ValueError):
                    raise ValueError(f"Gold label {label!r} is neither a label name nor a union id.") from None
                if value != label:
                    raise ValueError(f"Gold label {label!r} is not a whole number; union ids are integers.")
                if not 0 <= value < self.num_labels:
                    raise ValueError(f"Gold label id {value} is outside the union label space [0, {self.num_labels}).")
                ids.append(value)
        return ids

    def to_dict(self) -> dict:
        return {"labels": self.labels, "teachers": dict(zip(self.teacher_names, self.teacher_labels))}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {len(own)}" for n, own in zip(self.teacher_names, self.teacher_labels))
        return f"LabelSpace({self.num_labels} labels; {sizes})"
