"""How the cached-signal precompute scales with processes: the same pool on 1 process and on N (gloo on CPU).

Every process is started with ``torch.multiprocessing`` (``accelerate launch --cpu --num_processes N`` runs
ONE process, see docs/guides/multi_gpu.md) with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set, as a launcher
would, and one thread each (``OMP_NUM_THREADS=1``). Each builds a ``KnowledgeIntegrationTrainer`` over the
same two teachers and calls ``precompute_teacher_signals()`` on the same rows into a fresh cache directory.
What is timed: from a barrier after every process has built its trainer to the return of the precompute on
the main process (the shard merge and every process's load of the merged cache included; model loading and
imports excluded). The two caches are then compared row by row (they must be equal: the MC dropout of each
batch is seeded by its example ids, whichever process computes it).

Teachers: two ``sentence-transformers/paraphrase-MiniLM-L3-v2`` encoders (``ki_trainer.pretrained``, real
weights) with seeded, untrained 10-class heads over the two halves of debian_sections20's labels: the cost of
a teacher query does not depend on what the head learned. Rows: the first ``--rows`` training rows.

    # the measurement (2-core CPU, ~10-20 minutes; nothing else running)
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precompute_scaling.py
    # a smoke run (< 1 minute)
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precompute_scaling.py \
        --rows 32 --out /tmp/precompute-scaling-smoke.json

It prints a table and writes JSON (``--out``, default docs/results/precompute-scaling.json): settings, machine,
load average, every process count's wall time, the speed-up and the cache comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "sentence-transformers/paraphrase-MiniLM-L3-v2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_teachers(work: Path) -> list[str]:
    """Two teacher directories (real encoder, seeded 10-class heads over the two halves of the labels)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ki_trainer.data import load_debian_sections
    from ki_trainer.pretrained import resolve_model

    labels = sorted(set(load_debian_sections(split="train")["label"]))
    halves = [labels[: len(labels) // 2], labels[len(labels) // 2 :]]
    source = resolve_model(MODEL)
    paths = []
    for t, names in enumerate(halves):
        path = work / "teachers" / f"teacher_{t}"
        if not (path / "config.json").exists():
            torch.manual_seed(100 + t)
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=len(names), id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True)
            model.save_pretrained(path)
            AutoTokenizer.from_pretrained(source).save_pretrained(path)
        paths.append(str(path))
    return paths


def worker(rank: int, world: int, port: int, settings: dict) -> None:
    """One process: build the trainer, wait for the others, time the precompute, report (main process)."""
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher
    from ki_trainer.data import load_debian_sections
    from ki_trainer.pretrained import resolve_model

    rows = load_debian_sections(split="train").select(range(settings["rows"])).select_columns(["id", "text"])
    out = Path(settings["work"]) / f"p{world}"
    args = KnowledgeIntegrationConfig(
        output_dir=str(out / "run"), signal_source="cached", signal_cache_dir=str(out / "cache"), strategy="muki",
        router="mc_entropy",
        mc_samples=settings["mc_samples"], mc_top_layers=settings["top_layers"], max_length=settings["max_length"],
        per_device_eval_batch_size=settings["batch"], use_cpu=True, report_to="none", save_strategy="no",
        disable_tqdm=rank != 0, seed=0, max_steps=1,
    )
    trainer = KnowledgeIntegrationTrainer(
        model=resolve_model(MODEL), args=args, teachers=[Teacher(p) for p in settings["teachers"]],
        train_dataset=rows)
    assert trainer.accelerator.num_processes == world, "the processes did not form one group"
    trainer.accelerator.wait_for_everyone()
    start = time.perf_counter()
    cache = trainer.precompute_teacher_signals()
    seconds = time.perf_counter() - start
    if rank == 0:
        (out / "result.json").write_text(json.dumps({
            "processes": world, "seconds": seconds, "rows": len(cache), "cache": cache.path,
            "fingerprint": cache.fingerprint, "label_sizes": cache.label_sizes}))


def run(world: int, settings: dict) -> dict:
    import torch.multiprocessing as mp

    out = Path(settings["work"]) / f"p{world}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh cache: every row is computed
    mp.start_processes(worker, args=(world, _free_port(), settings), nprocs=world, join=True, start_method="spawn")
    return json.loads((out / "result.json").read_text())


def compare(results: list[dict]) -> dict:
    """Row-by-row comparison of every cache with the 1-process one (all tensors, all rows)."""
    from ki_trainer.signal_cache import TeacherSignalCache

    base = TeacherSignalCache.load(results[0]["cache"], results[0]["fingerprint"], results[0]["label_sizes"])
    ids = sorted(base.index)
    reference = {name: t[[base.index[i] for i in ids]] for name, t in base.tensors.items()}
    report = {}
    for result in results[1:]:
        other = TeacherSignalCache.load(result["cache"], result["fingerprint"], result["label_sizes"])
        same_ids = sorted(other.index) == ids
        tensors = other.tensors
        diffs = {name: float((tensors[name][[other.index[i] for i in ids]].float() - t.float()).abs().max())
                 for name, t in reference.items()} if same_ids else {}
        report[str(result["processes"])] = {"same_ids": same_ids, "max_abs_difference": diffs,
                                            "equal": same_ids and all(d <= 1e-5 for d in diffs.values())}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="training rows of debian_sections20")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (1 first)")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--mc-samples", type=int, default=8)
    parser.add_argument("--top-layers", type=int, default=1, help="mc_top_layers (0: full MC dropout)")
    parser.add_argument("--batch", type=int, default=32, help="per_device_eval_batch_size (rows per precompute batch)")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "precompute-scaling.json"))
    options = parser.parse_args()
    if options.processes[0] != 1:
        parser.error("--processes must start with 1 (the reference)")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_common import machine

    work = Path(options.work or tempfile.mkdtemp(prefix="precompute-scaling-"))
    settings = {"rows": options.rows, "max_length": options.max_length, "mc_samples": options.mc_samples,
                "top_layers": options.top_layers or None, "batch": options.batch, "work": str(work),
                "teachers": build_teachers(work)}
    load_before = os.getloadavg()
    results = [run(world, settings) for world in options.processes]
    load_after = os.getloadavg()
    equality = compare(results)
    base = results[0]["seconds"]
    print(f"\nprecompute of {options.rows} rows, 2 MiniLM-L3 teachers, K={options.mc_samples}, "
          f"top layers {settings['top_layers']}, {options.max_length} tokens, batch {options.batch}")
    print(f"{'processes':>9} {'seconds':>9} {'rows/s':>8} {'speed-up':>9} {'equal to 1 process':>19}")
    for result in results:
        p = result["processes"]
        same = "-" if p == 1 else str(equality[str(p)]["equal"])
        print(f"{p:>9} {result['seconds']:>9.1f} {options.rows / result['seconds']:>8.1f} "
              f"{base / result['seconds']:>8.2f}x {same:>19}")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "settings": {k: v for k, v in settings.items() if k not in ("work", "teachers")} | {"model": MODEL},
        "machine": machine(), "git_commit": commit, "load_average_before": load_before, "load_average_after": load_after,
        "results": [{**{k: r[k] for k in ("processes", "seconds", "rows")}, "speedup": base / r["seconds"]}
                    for r in results],
        "equality": equality,
    }
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {options.out}")
    if not all(e["equal"] for e in equality.values()):
        sys.exit("the caches differ: see the JSON")
    if options.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
