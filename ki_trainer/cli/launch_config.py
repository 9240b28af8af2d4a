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


def main(argv: Optional[Sequence[str]] = None, prog: str = "ki-trainer launch-config") -> Optional[Path]:
    argv = list(sys.argv[1:] if argv is None else argv)
    configs = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} NAME   prints the path of a shipped accelerate config file\n")
        for name, path in configs.items():
            first = path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
            print(f"  {name:18s}{first}")
        print("\nTPU: `accelerate config` (choose TPU) writes its own file; the trainer needs nothing else.")
        return None
    name = argv[0].removesuffix(".yaml")
    if name not in configs:
        raise SystemExit(f"{prog}: no config {argv[0]!r}; shipped: {', '.join(configs)}.")
    print(configs[name])
    return configs[name]
