"""What the cached precompute costs for each kind of router: MC statistics are computed only when read.

``muki`` with ``signal_source="cached"`` defaults to the ``relative_mahalanobis`` router, which reads each
teacher's logits and pooled features from ONE deterministic pass; MUKI as published (``router="mc_entropy"``)
reads the mean of K Monte-Carlo-dropout passes. The precompute therefore computes the K passes only for
routers that read them. This script times, side by side in one run on the same rows and teachers (each into
a fresh cache directory, in alternating order, best of ``--repeats``), ``precompute_teacher_signals()`` for:

- the cached default (relative_mahalanobis: logits + features, no MC);
- MUKI as published with the library defaults (mc_entropy, K=16 full passes);
- MUKI as published with ``mc_top_layers=1`` (dropout sampled in the top layer only);
- the default router with ``mc=True`` forced: the cost every default run paid before MC became on-demand.

Teachers: two ``sentence-transformers/paraphrase-MiniLM-L3-v2`` encoders with seeded 10-class heads (see
benchmarks/precompute_scaling.py: the cost of a query does not depend on what the head learned).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precompute_signals.py
    # smoke (< 1 minute)
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precompute_signals.py \
        --rows 16 --repeats 1 --out /tmp/precompute-signals-smoke.json

Prints a table and writes JSON (``--out``, default docs/results/precompute-signals.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

VARIANTS = {
    "cached default (relative_mahalanobis; logits + features)": dict(router=None),
    "MUKI as published (mc_entropy, K=16 full passes)": dict(router="mc_entropy"),
    "MUKI as published, mc_top_layers=1": dict(router="mc_entropy", mc_top_layers=1),
    "cached default with mc=True forced (the cost before MC was on demand)": dict(router=None, force_mc=True),
}


def measure(teachers: list[str], rows, options: dict, work: Path, max_length: int) -> tuple[float, list[str]]:
    from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher
    from ki_trainer.pretrained import resolve_model

    options = dict(options)
    force_mc = options.pop("force_mc", False)
    shutil.rmtree(work, ignore_errors=True)
    args = KnowledgeIntegrationConfig(
        output_dir=str(work / "run"), signal_source="cached", signal_cache_dir=str(work / "cache"), strategy="muki",
        max_length=max_length, per_device_eval_batch_size=32, use_cpu=True, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, **options,
    )
    trainer = KnowledgeIntegrationTrainer(model=resolve_model("sentence-transformers/paraphrase-MiniLM-L3-v2"),
                                          args=args, teachers=[Teacher(p) for p in teachers], train_dataset=rows)
    start = time.perf_counter()
    cache = trainer.precompute_teacher_signals(mc=True if force_mc else None)
    seconds = time.perf_counter() - start
    return seconds, sorted(cache.tensors)


def main(argv=None) -> dict:
    import torch

    from bench_common import machine
    from ki_trainer.data import load_debian_sections
    from precompute_scaling import build_teachers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "precompute-signals.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = load_debian_sections(split="train").select(range(args.rows)).select_columns(["id", "text"])
    work = Path(tempfile.mkdtemp(prefix="ki-precompute-signals-"))
    try:
        teachers = build_teachers(work / "teachers")
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        tensors: dict[str, list[str]] = {}
        for repeat in range(args.repeats):
            names = list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS))
            for name in names:
                seconds, held = measure(teachers, rows, VARIANTS[name], work / "run", args.max_length)
                times[name].append(seconds)
                tensors[name] = held
                print(f"  repeat {repeat}: {name}: {seconds:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = min(times["MUKI as published (mc_entropy, K=16 full passes)"])
    table = []
    for name in VARIANTS:
        best = min(times[name])
        table.append({"variant": name, "seconds": round(best, 2), "all_seconds": [round(t, 2) for t in times[name]],
                      "rows_per_second": round(args.rows / best, 1), "relative_to_mc_entropy": round(best / reference, 3),
                      "tensors": tensors[name]})
    result = {"settings": {"rows": args.rows, "max_length": args.max_length, "repeats": args.repeats, "teachers": 2,
                           "model": "sentence-transformers/paraphrase-MiniLM-L3-v2", "mc_samples": 16,
                           "machine": machine(),
                           "command": "python benchmarks/precompute_signals.py " + " ".join(argv or sys.argv[1:])},
              "rows": table}
    print(f"\n| precompute ({args.rows} rows, 2 teachers, {args.max_length} tokens) | seconds | rows/s | vs mc_entropy | cache holds |")
    print("|---|---|---|---|---|")
    for row in table:
        print(f"| {row['variant']} | {row['seconds']} | {row['rows_per_second']} | {row['relative_to_mc_entropy']:.3f}x | "
              f"{', '.join(row['tensors'])} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
