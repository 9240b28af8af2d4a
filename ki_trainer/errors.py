"""The base class of mistakes in a user's input (options, run files, data files) that the message alone lets them fix.

The ``ki-trainer`` command prints these without a traceback and exits with status 2; in Python they are
``ValueError``\\ s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class UsageError(ValueError):
    """Bad input, named with where it is (option, file, key, row) and what to change."""


class DataFileError(UsageError):
    """A data file that cannot be read as it is, named with its path and row."""


def first_non_utf8(path: Union[str, Path]) -> Optional[tuple[int, int, int]]:
    """(line number, byte column, the byte) of the first byte sequence of ``path`` that is not UTF-8, or None.

    Reads ``.gz`` / ``.xz`` / ``.bz2`` files decompressed.
    """
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(Path(path).suffix, open)
    with opener(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, error.start + 1, line[error.start]
    return None


def non_utf8_error(path: Union[str, Path]) -> Optional[DataFileError]:
    """A :class:`DataFileError` naming the file, line and byte that is not UTF-8 (None when the file is UTF-8)."""
    found = first_non_utf8(path)
    if found is None:
        return None
    line, column, byte = found
    return DataFileError(
        f"{path}, line {line}, byte {column}: 0x{byte:02x} is not UTF-8 (the file looks latin-1 / cp1252 encoded). "
        f"Save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {Path(path).name} > fixed_{Path(path).name}`."
    )
