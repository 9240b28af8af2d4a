"""How many unlabeled pool rows a transductive router needs: fit on random subsets of the pool.

Reads the signal caches that ``benchmarks/routing.py`` wrote for a split (run that first), fits each
router on random pool subsets of several sizes (label-free) and scores routing accuracy and the routed
ensemble on all test rows. Prints a table and writes ``<output_dir>/pool_size.json``.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/routing_pool_size.py \\
        --split 2x10 --output_dir outputs/routing/results/2x10
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402
from routing_eval import evaluate_router  # noqa: E402

from ki_trainer.signal_cache import TeacherSignalCache  # noqa: E402
from ki_trainer.strategies import TeacherSignals  # noqa: E402


def cached_signals(path: str, ids, label_sizes) -> TeacherSignals:
    """Rows ``ids`` of a signal-cache file the trainer wrote (``<fingerprint>[.<suffix>].safetensors``, with pooled features),
    read and checked by the library's own cache class."""
    fingerprint = Path(path).name.split(".")[0]
    return TeacherSignalCache.load(path, fingerprint, label_sizes).lookup([str(i) for i in ids], "mc")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--split", default="2x10")
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--cache_root", default="outputs/routing")
    parser.add_argument("--sizes", nargs="+", type=int, default=[300, 600, 1200, 2400, 4700])
    parser.add_argument("--routers", nargs="+", default=["mc_entropy", "relative_mahalanobis", "knn_smoothing", "self_training"])
    args = parser.parse_args(argv)
    data = common.load_labelled(args.data)
    slug = common.split_slug(args.split, args.split_seed)
    root = Path(args.cache_root)
    blocks = [r["labels"] for r in json.loads((root / "teachers" / common.data_name(args.data) / slug / "teachers.json").read_text())["teachers"]]
    sizes = [len(b) for b in blocks]
    cache = root / "cache" / common.data_name(args.data) / slug
    # the cache files by their format-3 names (a format-2 `.pt` file of the same name is migrated when loaded)
    files = sorted({str(Path(f).with_suffix(".safetensors")) for f in glob.glob(str(cache / "*.safetensors"))
                    + glob.glob(str(cache / "*.pt"))})
    pool_file = next(f for f in files if ".test" not in Path(f).name)
    test_file = next(f for f in files if ".test" in Path(f).name)
    test = cached_signals(test_file, data["test"]["id"], sizes)
    rows = []
    for n in args.sizes:
        subset = data["train"].select(sorted(random.Random(0).sample(range(len(data["train"])), min(n, len(data["train"])))))
        pool = cached_signals(pool_file, subset["id"], sizes)
        for name in args.routers:
            record = evaluate_router(name, None, pool, test, blocks, subset["label"], data["test"]["label"], 0, None)
            rows.append({"pool_rows": len(subset), "router": name, "routing_accuracy": record["routing_accuracy"],
                         "accuracy": record["accuracy"], "fit_seconds": record["fit_seconds"]})
            print(f"pool {len(subset):5d} {name:22s} test routing {record['routing_accuracy']:.3f} "
                  f"ensemble {record['accuracy']:.3f}", flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "settings": {"split": args.split, "data": common.data_name(args.data), "machine": common.machine()}}
    (out / "pool_size.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
