"""``ki-trainer env``: what to paste into a bug report, as ``transformers env`` and ``trl env`` print it.

Versions of ki-trainer and the stack it runs on, Python and platform, the devices torch sees, and the
default accelerate config (the file ``accelerate config`` wrote, if any).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Optional, Sequence

PACKAGES = ("transformers", "torch", "accelerate", "datasets", "tokenizers", "peft", "evaluate",
            "huggingface_hub", "safetensors", "numpy", "deepspeed")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[str]:
    import torch

    lines = [f"CUDA available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        lines += [f"  GPU {i}: {torch.cuda.get_device_name(i)}, "
                  f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.1f} GiB" for i in range(torch.cuda.device_count())]
        lines.append(f"  CUDA {torch.version.cuda}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        lines.append("MPS available: True")
    lines.append(f"CPU threads (torch): {torch.get_num_threads()}, CPU cores: {os.cpu_count()}")
    return lines


def _accelerate_config() -> list[str]:
    try:
        from accelerate.commands.config import default_config_file
    except ImportError:
        return ["accelerate config: accelerate not installed"]
    if not os.path.isfile(default_config_file):
        return [f"accelerate config: none ({default_config_file} does not exist; `accelerate config` writes it)"]
    with open(default_config_file, encoding="utf-8") as file:
        body = [f"  {line.rstrip()}" for line in file if line.strip()]
    return [f"accelerate config ({default_config_file}):", *body]


def report() -> str:
    """The environment report as text."""
    from .._version import __version__

    lines = [f"- ki-trainer version: {__version__}",
             f"- Platform: {platform.platform()}",
             f"- Python version: {sys.version.split()[0]} ({sys.executable})"]
    lines += [f"- {name} version: {_version(name)}" for name in PACKAGES]
    offline = {var: os.environ[var] for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                "HF_HOME", "KI_TRAINER_CACHE") if var in os.environ}
    lines.append(f"- Environment: {offline or 'no HF_* / KI_TRAINER_* variables set'}")
    lines += [f"- {line}" if not line.startswith("  ") else line for line in _devices()]
    lines += [f"- {line}" if not line.startswith("  ") else line for line in _accelerate_config()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: str = "ki-trainer env") -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: {prog}\n\n{__doc__.strip()}")
        return ""
    if argv:
        from .errors import CommandError

        raise CommandError(f"{prog} takes no options (got {' '.join(argv)}).")
    text = report()
    print("\nCopy-and-paste the text below in your GitHub issue.\n\n" + text + "\n")
    return text
