"""The embedded Debian-sections benchmark, and how to carve its classes among teachers.

Knowledge integration needs teachers that each know only part of the label set. This module loads
the real, offline benchmark shipped in ``data/`` and as package data (see ``data/README.md`` for its provenance) as
plain ``datasets`` objects and splits its 20 labels into disjoint teacher subsets, so examples,
tests and benchmarks all build teachers the same way.
"""

from __future__ import annotations

import functools
import json
import lzma
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import datasets

# Package data, so a plain ``pip install`` can run the demo. In a source checkout this is a symbolic
# link to ``<repo>/data/debian_sections20.jsonl.xz`` (one copy in the repository); wheels hold the file.
DEFAULT_DATA_PATH = Path(__file__).resolve().parent / "resources" / "debian_sections20.jsonl.xz"
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
_GRID_SPEC = re.compile(r"^(?P<random>random:)?(?P<teachers>\d+)x(?P<size>\d+)$")

PathLike = Union[str, Path]


@functools.lru_cache(maxsize=4)
def _read_rows(path: str) -> tuple[dict[str, Any], ...]:
    """Parse the JSON Lines file (plain, or xz-compressed by its ``.xz`` suffix) once per process."""
    from .errors import DataFileError, non_utf8_error

    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        rows = []
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataFileError(f"{path}, line {number}: not valid JSON ({error}).") from None
        except UnicodeDecodeError:
            raise (non_utf8_error(path) or DataFileError(f"{path}: not UTF-8 text.")) from None
        return tuple(rows)


def _row_id(row: dict[str, Any], position: int) -> str:
    """A row's example id: ``package`` (debian_sections20), else ``id``, else its line position."""
    for key in ("package", "id"):
        if row.get(key) is not None:
            return str(row[key])
    return f"row-{position}"


def _resolve_path(path: Optional[PathLike]) -> Path:
    file = Path(path) if path is not None else DEFAULT_DATA_PATH
    if not file.is_file():
        hint = "" if path is not None else " (the package data file; reinstall ki-trainer or pass path=)"
        raise FileNotFoundError(f"Debian sections data file not found: {file}{hint}.")
    return file


def _canonical_split(split: str) -> str:
    name = _SPLIT_ALIASES.get(split, split)
    if name not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {list(SPLITS)} (or 'validation').")
    return name


def load_debian_sections(
    path: Optional[PathLike] = None,
    split: Optional[str] = None,
    language: str = "en",
) -> Union[datasets.Dataset, datasets.DatasetDict]:
    """Load the 20-section Debian package-description benchmark (or any labelled JSON Lines file).

    Args:
        path: a ``.jsonl`` or ``.jsonl.xz`` file whose rows hold ``text``, ``label`` and ``split``
            (``train``/``val``/``test``; ids from ``package`` or ``id`` when present, else the line
            position; other fields are ignored); defaults to the copy shipped with the package.
        split: ``"train"``, ``"val"`` (alias ``"validation"``) or ``"test"``; ``None`` returns a
            ``DatasetDict`` with all three.
        language: ``"en"`` uses the original English text. Any other code (``"de"``, ``"fr"``, ...)
            uses that DDTP translation and DROPS rows that have none, so split sizes shrink.

    Returns:
        Dataset(s) with columns ``id`` (the binary package name, unique), ``text``, ``label`` (the
        section name) and ``split``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: unknown split or language, or duplicate package ids in the file.
    """
    rows = _read_rows(str(_resolve_path(path)))
    wanted = [_canonical_split(split)] if split is not None else list(SPLITS)

    languages = {"en"} | {lang for row in rows for lang in row.get("texts", {})}
    if language not in languages:
        raise ValueError(f"Unknown language {language!r}; the file has translations for {sorted(languages)}.")

    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("text", "label", "split") if key not in row]
        if missing:
            raise ValueError(f"{path or DEFAULT_DATA_PATH}: row {number} lacks field(s) {missing}; every row needs "
                             "'text', 'label' and 'split' (train/val/test).")
    ids = Counter(_row_id(row, i) for i, row in enumerate(rows))
    duplicates = sorted(name for name, count in ids.items() if count > 1)
    if duplicates:
        raise ValueError(f"Package ids must be unique but {len(duplicates)} repeat, e.g. {duplicates[:5]}.")

    by_split: dict[str, list[dict[str, str]]] = {name: [] for name in wanted}
    for position, row in enumerate(rows):
        row_split = _SPLIT_ALIASES.get(row["split"], row["split"])
        if row_split not in by_split:
            continue
        text = row["text"] if language == "en" else row.get("texts", {}).get(language)
        if text is None:
            continue
        record = {"id": _row_id(row, position), "text": text, "label": str(row["label"]), "split": row_split}
        by_split[row_split].append(record)

    features = datasets.Features({name: datasets.Value("string") for name in ("id", "text", "label", "split")})
    built = {name: datasets.Dataset.from_list(items, features=features) for name, items in by_split.items()}
    return built[wanted[0]] if split is not None else datasets.DatasetDict(built)


def _check_partition(labels: list[str], groups: list[list[str]]) -> None:
    """Raise unless ``groups`` covers every label exactly once with at least 2 labels per teacher."""
    seen = Counter(label for group in groups for label in group)
    repeated = sorted(label for label, count in seen.items() if count > 1)
    missing = sorted(set(labels) - set(seen))
    unknown = sorted(set(seen) - set(labels))
    if repeated or missing or unknown:
        raise ValueError(
            "Teacher label subsets must cover every label exactly once: "
            f"repeated {repeated}, missing {missing}, unknown {unknown}."
        )
    small = [i for i, group in enumerate(groups) if len(group) < 2]
    if small:
        raise ValueError(f"Teacher subsets {small} have fewer than 2 labels; a classifier needs at least 2 classes.")


def partition_labels(
    labels: Iterable[str],
    spec: Union[str, Sequence[Sequence[str]]],
    seed: int = 0,
) -> list[list[str]]:
    """Split a label set into disjoint teacher label subsets.

    Args:
        labels: the full label set (duplicates are ignored).
        spec: ``"NxK"`` gives N teachers of K labels each, in sorted-name order (``"2x10"``: the
            first 10 sorted names, then the next 10); ``"random:NxK"`` shuffles with ``seed`` first
            (each subset is then sorted); a list of lists (or its JSON text, handy on a command
            line) is taken as given.
        seed: seed for ``"random:"`` specs only.

    Returns:
        One list of label names per teacher.

    Raises:
        ValueError: the spec is malformed, or its subsets do not cover every label exactly once,
            or a subset has fewer than 2 labels.
    """
    names = sorted(set(labels))
    if isinstance(spec, str) and spec.lstrip().startswith("["):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as error:
            raise ValueError(f"Label partition spec looks like JSON but does not parse: {error}") from None

    if isinstance(spec, str):
        match = _GRID_SPEC.match(spec.strip())
        if match is None:
            raise ValueError(
                f"Bad label partition spec {spec!r}; use 'NxK' (e.g. '2x10'), 'random:NxK' or a list of label lists."
            )
        teachers, size = int(match["teachers"]), int(match["size"])
        if teachers * size != len(names):
            raise ValueError(
                f"Spec {spec!r} asks for {teachers} x {size} = {teachers * size} labels but there are {len(names)}."
            )
        order = list(names)
        if match["random"]:
            random.Random(seed).shuffle(order)
        groups = [order[i * size : (i + 1) * size] for i in range(teachers)]
        if match["random"]:
            groups = [sorted(group) for group in groups]
    else:
        if not all(isinstance(group, (list, tuple)) for group in spec):
            raise ValueError("An explicit label partition must be a list of label lists, e.g. [['a', 'b'], ['c']].")
        groups = [[str(label) for label in group] for group in spec]

    _check_partition(names, groups)
    return groups


def filter_by_labels(
    dataset: Union[datasets.Dataset, datasets.DatasetDict],
    labels: Iterable[str],
    label_column: str = "label",
) -> Union[datasets.Dataset, datasets.DatasetDict]:
    """Keep the rows whose ``label_column`` is in ``labels`` (a teacher's view of the data)."""
    keep = set(labels)
    columns = dataset.column_names
    present = columns if isinstance(columns, list) else next(iter(columns.values()), [])
    if label_column not in present:
        raise ValueError(f"Column {label_column!r} not in dataset columns {present}.")
    return dataset.filter(lambda batch: [value in keep for value in batch[label_column]], batched=True)


def cap_per_class(
    dataset: datasets.Dataset,
    max_per_class: Optional[int],
    seed: int = 0,
    label_column: str = "label",
) -> datasets.Dataset:
    """Keep at most ``max_per_class`` rows of each label, chosen at random with ``seed``.

    Small balanced subsets make CPU smoke runs quick; ``None`` keeps everything.
    """
    if max_per_class is None:
        return dataset
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}.")
    column = list(dataset[label_column])
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    taken: Counter = Counter()
    keep = []
    for index in order:
        label = column[index]
        if taken[label] < max_per_class:
            taken[label] += 1
            keep.append(index)
    return dataset.select(sorted(keep))


def label_maps(labels: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """``(id2label, label2id)`` for a classifier config, ids in the given label order."""
    if len(set(labels)) != len(labels):
        raise ValueError(f"Labels must be distinct, got {list(labels)}.")
    id2label = dict(enumerate(labels))
    return id2label, {label: i for i, label in id2label.items()}
