"""Writing Hugging Face model directories safely.

Assembly takes seconds to minutes and handles hundreds of MB; a crash or Ctrl-C half way must
never leave a directory that ``from_pretrained`` would half-load. So every assembler fills a
temporary sibling directory and renames it into place only when complete (rename is atomic on
one filesystem): the final path either does not exist or holds a whole model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

MARKER = ".ki_trainer_assembled.json"


@contextmanager
def atomic_directory(dest: str | os.PathLike, info: Mapping[str, object] | None = None) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``dest`` when the block exits cleanly.

    A marker file recording ``info`` (source packages, etc.) is written last. If ``dest``
    appeared meanwhile (a concurrent assembly), the staged copy is discarded and ``dest`` kept.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield staging
        (staging / MARKER).write_text(json.dumps(dict(info or {}), indent=2) + "\n")
        _apply_umask(staging)
        try:
            os.rename(staging, dest)
        except OSError:
            if not (dest / MARKER).exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _apply_umask(root: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; give the cache ordinary permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_bert_dir(
    out_dir: Path,
    config: Mapping[str, object],
    weights: Mapping[str, np.ndarray],
) -> None:
    """Write ``config.json`` and ``model.safetensors`` (BertModel key names, float32)."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig

    cfg = BertConfig(**config)
    cfg.architectures = ["BertModel"]
    cfg.save_pretrained(out_dir)
    tensors = {k: torch.from_numpy(np.require(v, np.float32, ["C", "W"])) for k, v in weights.items()}
    save_file(tensors, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})


def copy_files(src_dir: Path, out_dir: Path, names: tuple[str, ...]) -> None:
    """Copy the named files that exist in ``src_dir`` (tokenizer files, typically)."""
    for name in names:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(out_dir) / name)


BERT_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
