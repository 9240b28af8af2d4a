"""``ki-trainer launch-config``: the accelerate config files shipped with the package.

    accelerate launch --config_file "$(ki-trainer launch-config fsdp)" -m ki_trainer integrate run.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

CONFIG_DIR = Path(__file__).resolve().parent.parent / "launch_configs"


def available() -> dict[str, Path]:
    """Config name (file stem) -> path, e.g. ``{"multi_gpu": .../multi_gpu.yaml, ...}``."""
    return {path.stem: path for path in sorted(CONFIG_DIR.glob("*.yaml"))}


def describe(path: Path) -> str:
    """The first sentence of a config file's header comment (which may span several comment lines)."""
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or line.startswith("#   "):  # the end of the header, or a command example
            break
        words += line.lstrip("# ").split()
    text = " ".join(words)
    for end in range(len(text)):
        if text[end] == "." and (end + 1 == len(text) or text[end + 1] == " ") and not text[:end].endswith(("e.g", "i.e")):
            return text[: end + 1]
    return text


def main(argv: Optional[Sequence[str]] = None, prog: str = "ki-trainer launch-config") -> Optional[Path]:
    argv = list(sys.argv[1:] if argv is None else argv)
    configs = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} NAME   prints the path of a shipped accelerate config file\n")
        for name, path in configs.items():
            print(f"  {name:18s}{describe(path)}")
        print("\nTPU: `accelerate config` (choose TPU) writes its own file; the trainer needs nothing else.")
        return None
    name = argv[0].removesuffix(".yaml")
    if name not in configs:
        raise SystemExit(f"{prog}: no config {argv[0]!r}; shipped: {', '.join(configs)}.")
    print(configs[name])
    return configs[name]
