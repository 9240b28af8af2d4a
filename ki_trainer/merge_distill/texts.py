"""MergeDistill's training text: unlabeled rows with a language, read from JSON Lines / JSON / CSV / TSV files
(optionally ``.gz`` / ``.xz`` / ``.bz2``) or ``debian_ddtp`` JSON Lines, checked row by row."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

DATA_FORMATS = ("auto", "rows", "debian_ddtp")
DDTP_SOURCES = ("by_split", "all")
_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


def ddtp_split_of(source: str) -> str:
    """debian_sections20's split of a source package (``shared/data/README.md``): train / val / test by
    ``int(sha1("split:" + source)) % 100`` below 70 / 80 / else."""
    u = int(hashlib.sha1(f"split:{source}".encode()).hexdigest(), 16) % 100
    return "train" if u < 70 else "val" if u < 80 else "test"


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` / ``.json`` (a list or JSON Lines) / ``.csv`` / ``.tsv`` file, optionally
    compressed (``.gz``, ``.xz``, ``.bz2``)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Text file not found: {path}")
    suffixes = file.suffixes
    opener = _OPENERS.get(suffixes[-1] if suffixes else "", open)
    kind = (suffixes[-2] if opener is not open and len(suffixes) > 1 else file.suffix).lower()
    with opener(file, "rt", encoding="utf-8") as handle:
        text = handle.read()
    if kind in (".csv", ".tsv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if kind == ".tsv" else ","))
    if kind not in (".json", ".jsonl"):
        raise ValueError(f"{path}: unknown text file type {kind!r}; use .jsonl, .json, .csv or .tsv (optionally .gz/.xz/.bz2).")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error}).") from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, row {number}: expected an object with named fields, got {type(row).__name__}.")
    return rows


def load_texts(
    files: Sequence[str],
    languages: Sequence[str],
    *,
    split: str = "train",
    data_format: str = "auto",
    ddtp_sources: str = "by_split",
    max_rows_per_language: Optional[int] = None,
    text_column: str = "text",
    language_column: str = "language",
    id_column: str = "id",
):
    """Unlabeled rows ``{id, text, language}`` (under the given column names) as a ``datasets.Dataset``.

    Args:
        files: text files (see :func:`read_rows`).
        languages: the languages that have a teacher; empty = one teacher that reads every text.
        split: ``"train"`` or ``"eval"``: which debian_ddtp sources are read with ``ddtp_sources="by_split"``.
        data_format: ``"rows"``, ``"debian_ddtp"`` or ``"auto"`` (per file, from its first row).
        max_rows_per_language: keep the first N rows of each language, in file order.

    The rows come grouped by language, in the order of ``languages``, in file order within a language.

    Raises:
        ValueError: a row without text or language (named by file and row), a row whose language has no
            teacher, a teacher language without any text, or no text at all.
    """
    from datasets import Dataset

    wanted = set(languages)
    kept: list[dict[str, str]] = []
    per_language: Counter = Counter()
    ddtp_split = "train" if split == "train" else "val"
    for path in files:
        rows = read_rows(path)
        if not rows:
            continue
        kind = data_format
        if kind == "auto":
            kind = "debian_ddtp" if language_column not in rows[0] and {"lang", "package", "text"} <= set(rows[0]) else "rows"
        for number, row in enumerate(rows, start=1):
            where = f"{path}, row {number}"
            if kind == "debian_ddtp":
                missing = [key for key in ("lang", "package", "text") if key not in row]
                if missing:
                    raise ValueError(f"{where}: a debian_ddtp row needs lang, package and text (missing {missing}).")
                language = str(row["lang"])
                if (wanted and language not in wanted) or not str(row["text"]).strip():
                    continue
                if ddtp_sources == "by_split" and ddtp_split_of(str(row.get("source") or row["package"])) != ddtp_split:
                    continue
                example = {id_column: f"{language}:{row['package']}", text_column: str(row["text"]), language_column: language}
            else:
                text, language = row.get(text_column), row.get(language_column)
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"{where}: no text in field {text_column!r} (fields: {sorted(row)}).")
                if wanted or language_column in row:
                    if language is None or not str(language).strip():
                        raise ValueError(f"{where}: no language in field {language_column!r} (fields: {sorted(row)}); "
                                         "each text needs the language that picks its teacher.")
                    language = str(language)
                    if wanted and language not in wanted:
                        raise ValueError(f"{where}: language {language!r} has no teacher; teachers cover "
                                         f"{sorted(wanted)}. Add a teacher for it or remove those rows.")
                else:
                    language = ""
                row_id = row.get(id_column)
                example = {id_column: str(row_id) if row_id not in (None, "") else f"{Path(path).name}:{number}",
                           text_column: text, language_column: language}
            if max_rows_per_language is not None and per_language[example[language_column]] >= max_rows_per_language:
                continue
            per_language[example[language_column]] += 1
            kept.append(example)
    # Grouped by language, in the order of `languages` (then first appearance), file order within a language.
    order = {lang: i for i, lang in enumerate(dict.fromkeys([*languages, *(row[language_column] for row in kept)]))}
    kept.sort(key=lambda row: order[row[language_column]])  # stable
    if not kept:
        raise ValueError(f"No {split} text in {list(files)}" + (f" for languages {sorted(wanted)}." if wanted else "."))
    without = sorted(wanted - set(per_language))
    if without and split == "train":
        raise ValueError(f"No training text for language(s) {without} in {list(files)}: their teacher would teach nothing.")
    return Dataset.from_list(kept)
