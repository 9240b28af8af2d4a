"""Quality benchmark: knowledge integration on debian_sections20 against its references.

One command reproduces the whole table for two teacher splits, "2x10" (10 | 10 classes by sorted
name) and "4x5":

* each teacher alone, on the test rows of its own classes;
* the oracle: the same student architecture fine-tuned WITH all labels (plain ``Trainer``);
* the ensemble at inference: per example, the prediction of the most certain teacher, routed by
  MC-dropout certainty and by deterministic-entropy certainty (what a student tries to compress);
* label-free students: vanilla KD, UHC, entropy selection, MUKI hard and MUKI soft, the certainty
  strategies with and without margin re-weighting.

Accuracy and macro-F1 are mean ± std over the seeds (student / oracle training seeds); routing
accuracy is the share of test rows whose most certain teacher owns the gold class. Writes
``results.json``, ``results.md`` and ``results.png`` to ``--output_dir``; every finished job is
recorded under ``<output_dir>/records`` so an interrupted run resumes where it stopped.

    # CPU, ~2-core machine: see docs/results.md for the measured wall time
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/quality.py --config reduced
    # GPU (all-MiniLM-L6-v2, 128 tokens, 4 epochs, bs 32, lr 5e-5, MC K=16, teachers retrained per seed)
    HF_HUB_OFFLINE=1 python benchmarks/quality.py --config full

Sizes (``CONFIGS`` below): ``reduced`` caps the data per class (train 30/class = 600 rows that the
teachers learn from with labels and the students read WITHOUT labels; test 30/class = 542 rows),
truncates at 48 tokens, uses paraphrase-MiniLM-L3-v2, MC K=8, and trains one teacher set (seed 0)
shared by the 3 student seeds; ``full`` uses all data. Students read cached teacher signals
(``teacher_signals="cached"``) when the installed ki_trainer offers it: computed once per teacher
set and reused by every strategy and seed.

Students are evaluated by a plain forward pass over the test rows (no teacher queries), so the
per-student cost is training only; teacher signals on the test rows are computed once per teacher
set (for the teacher and ensemble rows and the routing accuracies).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import importlib.util
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, LabelSpace, Teacher  # noqa: E402
from ki_trainer.data import cap_per_class, filter_by_labels, load_debian_sections, partition_labels  # noqa: E402
from ki_trainer.metrics import accuracy, integration_metrics, macro_f1, selection_accuracy  # noqa: E402
from ki_trainer.numerics import certainty_from_logits  # noqa: E402
from ki_trainer.pretrained import resolve_model  # noqa: E402
from ki_trainer.querying import query_teachers  # noqa: E402


def _load_train_teachers():
    """examples/train_teachers.py as a module: the teachers are trained exactly as that script does."""
    spec = importlib.util.spec_from_file_location("train_teachers", REPO / "examples" / "train_teachers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


train_teachers = _load_train_teachers()

CONFIGS: dict[str, dict[str, Any]] = {
    "reduced": dict(
        model="sentence-transformers/paraphrase-MiniLM-L3-v2",
        max_length=48,
        train_per_class=30,
        test_per_class=30,
        teacher_epochs=4,
        epochs=2,
        batch_size=16,
        learning_rate=2e-4,
        mc_samples=8,
        per_seed_teachers=False,
    ),
    "full": dict(
        model="sentence-transformers/all-MiniLM-L6-v2",
        max_length=128,
        train_per_class=None,
        test_per_class=None,
        teacher_epochs=4,
        epochs=4,
        batch_size=32,
        learning_rate=5e-5,
        mc_samples=16,
        per_seed_teachers=True,
    ),
    # a few minutes on CPU: checks that the pipeline runs end to end, numbers are meaningless
    "smoke": dict(
        model="sentence-transformers/paraphrase-MiniLM-L3-v2",
        max_length=32,
        train_per_class=4,
        test_per_class=3,
        teacher_epochs=1,
        epochs=1,
        batch_size=16,
        learning_rate=2e-4,
        mc_samples=2,
        per_seed_teachers=False,
    ),
}
SPLITS = ("2x10", "4x5")
SEEDS = (0, 1, 2)
DATA_SEED = 0  # which rows the per-class caps keep: fixed, so every run sees the same data

# name -> (strategy, selection, margin re-weighting, margin weights divided by their batch mean)
STUDENTS: dict[str, tuple[str, str, bool, bool]] = {
    "vanilla_kd": ("vanilla_kd", "soft", False, False),
    "uhc": ("uhc", "soft", False, False),
    "entropy_soft": ("entropy", "soft", False, False),
    "entropy_soft+margin": ("entropy", "soft", True, False),
    "muki_hard": ("muki", "hard", False, False),
    "muki_hard+margin": ("muki", "hard", True, False),
    "muki_soft": ("muki", "soft", False, False),
    "muki_soft+margin": ("muki", "soft", True, False),
    # not in the paper: the same margin weights renormalised to mean 1 per batch (normalize_margin_weights)
    "muki_soft+margin_norm": ("muki", "soft", True, True),
}
ROUTING_OF = {"entropy": "deterministic", "muki": "mc"}
HAS_SIGNAL_CACHE = "teacher_signals" in {f.name for f in dataclasses.fields(KnowledgeIntegrationConfig)}


# ---------------------------------------------------------------------------------------- data
def load_data(cfg: dict[str, Any]):
    """(train rows the teachers/oracle learn from and students read unlabeled, test rows)."""
    data = load_debian_sections()
    train = cap_per_class(data["train"], cfg["train_per_class"], seed=DATA_SEED)
    test = cap_per_class(data["test"], cfg["test_per_class"], seed=DATA_SEED)
    return train, data["val"], test


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def common_training_args(cfg: dict[str, Any], output_dir: Path, seed: int, epochs: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=cfg["batch_size"],
        learning_rate=cfg["learning_rate"],
        seed=seed,
        data_seed=seed,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
    )


@torch.no_grad()
def predict_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Plain forward pass of a classifier over raw texts (eval mode, fp32 logits)."""
    model.eval().to(device())
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        out.append(model(**batch.to(device())).logits.float().cpu())
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------- jobs
def teacher_set_dir(out: Path, split: str, teacher_seed: int) -> Path:
    return out / "teachers" / split / f"seed{teacher_seed}"


def job_teacher(cfg, out: Path, split: str, teacher_seed: int, index: int) -> dict[str, Any]:
    """Fine-tune (or reuse) teacher ``index`` of ``split`` with examples/train_teachers.py's code."""
    from transformers import AutoTokenizer, TrainingArguments

    train, val, _ = load_data(cfg)
    labels = partition_labels(train["label"], split)[index]
    model_path = str(resolve_model(cfg["model"]))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    teacher_dir = teacher_set_dir(out, split, teacher_seed) / f"teacher_{index}"
    splits = train_teachers.datasets.DatasetDict({"train": filter_by_labels(train, labels), "val": filter_by_labels(val, labels)})
    encoded = train_teachers.encode(splits, tokenizer, labels, cfg["max_length"])
    args = TrainingArguments(**common_training_args(cfg, teacher_dir.parent / "tmp", teacher_seed, cfg["teacher_epochs"]))
    cached = train_teachers.is_cached(teacher_dir, labels)
    val_accuracy = train_teachers.train_and_evaluate_teacher(
        model_path, labels, encoded, tokenizer, args, teacher_dir, train=not cached
    )
    shutil.rmtree(teacher_dir.parent / "checkpoints", ignore_errors=True)
    return {"labels": labels, "val_accuracy": val_accuracy, "num_train": len(encoded["train"]), "cached": cached}


def job_signals(cfg, out: Path, split: str, teacher_seed: int, index: int) -> dict[str, Any]:
    """One teacher's deterministic logits, MC and entropy certainty on the test rows (saved as .npz)."""
    from transformers import AutoTokenizer

    _, _, test = load_data(cfg)
    teacher_dir = teacher_set_dir(out, split, teacher_seed) / f"teacher_{index}"
    teacher = Teacher(str(teacher_dir)).prepare(device(), torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    accepted = teacher.accepted_inputs()
    torch.manual_seed(teacher_seed)
    logits, mc = [], []
    texts = test["text"]
    for start in range(0, len(texts), 32):
        batch = tokenizer(texts[start : start + 32], truncation=True, max_length=cfg["max_length"], padding=True, return_tensors="pt")
        inputs = {k: v.to(device()) for k, v in batch.items() if k in accepted}
        signals = query_teachers([teacher], [inputs], "mc", mc_samples=cfg["mc_samples"], chunk_size=512)
        logits.append(signals.logits[0].cpu())
        mc.append(signals.certainty[:, 0].cpu())
    logits = torch.cat(logits)
    deterministic = certainty_from_logits(logits)
    path = teacher_dir.parent / f"test_signals_{index}.npz"
    np.savez(path, logits=logits.numpy(), mc=torch.cat(mc).numpy(), deterministic=deterministic.numpy())
    return {"path": str(path.relative_to(out))}


def job_oracle(cfg, out: Path, seed: int) -> dict[str, Any]:
    """The same student architecture fine-tuned WITH all labels, with the students' recipe."""
    from transformers import AutoTokenizer, TrainingArguments

    train, val, test = load_data(cfg)
    labels = sorted(set(train["label"]))
    model_path = str(resolve_model(cfg["model"]))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model_dir = out / "oracle" / f"seed{seed}"
    encoded = train_teachers.encode(
        train_teachers.datasets.DatasetDict({"train": train, "val": val}), tokenizer, labels, cfg["max_length"]
    )
    args = TrainingArguments(**common_training_args(cfg, model_dir / "tmp", seed, cfg["epochs"]))
    train_teachers.train_and_evaluate_teacher(model_path, labels, encoded, tokenizer, args, model_dir / "model", train=True)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir / "model"))
    logits = predict_logits(model, tokenizer, test["text"], cfg["max_length"])
    space = LabelSpace([labels])
    metrics = integration_metrics(logits, np.array(space.encode(test["label"])), space)
    shutil.rmtree(model_dir, ignore_errors=True)  # only the numbers are needed
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def job_student(cfg, out: Path, split: str, seed: int, teacher_seed: int, method: str) -> dict[str, Any]:
    """A label-free student integrated from the split's teachers, evaluated by a plain forward pass."""
    from transformers import set_seed

    strategy, selection, margin, normalize = STUDENTS[method]
    train, _, test = load_data(cfg)
    unlabeled = train.remove_columns(["label", "split"])  # id + text only: no labels reach the trainer
    teacher_root = teacher_set_dir(out, split, teacher_seed)
    teachers = [Teacher(str(path)) for path in sorted(teacher_root.glob("teacher_*"), key=lambda p: int(p.name.split("_")[1]))]
    run_dir = out / "students" / split / method / f"seed{seed}"
    extra = {}
    if HAS_SIGNAL_CACHE:
        extra = dict(teacher_signals="cached", signal_cache_dir=str(teacher_root / "signal_cache"))
    args = KnowledgeIntegrationConfig(
        **common_training_args(cfg, run_dir, seed, cfg["epochs"]),
        strategy=strategy,
        selection=selection,
        margin_reweighting=margin,
        normalize_margin_weights=normalize,
        mc_samples=cfg["mc_samples"],
        max_length=cfg["max_length"],
        **extra,
    )
    set_seed(seed)  # the trainer builds the student's new head before Trainer seeds anything
    trainer = KnowledgeIntegrationTrainer(
        model=str(resolve_model(cfg["model"])), args=args, teachers=teachers, train_dataset=unlabeled
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    logits = predict_logits(trainer.model, trainer.processing_class, test["text"], cfg["max_length"])
    space = trainer.label_space
    metrics = integration_metrics(logits, np.array(space.encode(test["label"])), space)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "train_seconds": train_seconds,
            "signal_cache": HAS_SIGNAL_CACHE}


JOBS = {"teacher": job_teacher, "signals": job_signals, "oracle": job_oracle, "student": job_student}


def run_job(config_name: str, out: str, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one job unless its record exists; returns the record (with its wall time)."""
    out_path = Path(out)
    key = kind + "".join(f"__{k}={v}" for k, v in params.items())
    record_file = out_path / "records" / f"{key}.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    start = time.perf_counter()
    result = JOBS[kind](CONFIGS[config_name], out_path, **params)
    record = {"kind": kind, **params, **result, "seconds": round(time.perf_counter() - start, 1)}
    record_file.parent.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[{time.strftime('%H:%M:%S')}] done {key} in {record['seconds']} s", flush=True)
    return record


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()


# ---------------------------------------------------------------------------------------- analysis
def teacher_and_ensemble_rows(cfg, out: Path, split: str, teacher_seed: int, test_labels: list[str]):
    """Rows for each teacher alone and for the ensemble routed by each certainty score."""
    subsets = partition_labels(test_labels, split)
    root = teacher_set_dir(out, split, teacher_seed)
    signals = [np.load(root / f"test_signals_{t}.npz") for t in range(len(subsets))]
    space = LabelSpace(subsets, [f"teacher_{t}" for t in range(len(subsets))])
    gold = np.array(space.encode(test_labels))
    rows = {}
    for t, own in enumerate(subsets):
        mask = np.isin(np.array(test_labels), own)
        predicted = space.teacher_to_union(t).numpy()[signals[t]["logits"].argmax(1)]
        rows[f"teacher {t + 1}/{len(subsets)} (own {len(own)} classes)"] = {
            "accuracy": accuracy(predicted[mask], gold[mask]),
            "macro_f1": macro_f1(predicted[mask], gold[mask]),
        }
    for source, name in (("mc", f"ensemble routed by MC certainty (K={cfg['mc_samples']})"),
                         ("deterministic", "ensemble routed by entropy certainty")):
        certainty = np.stack([s[source] for s in signals], axis=1)
        chosen = certainty.argmax(1)
        predicted = np.array([space.teacher_to_union(t).numpy()[signals[t]["logits"][i].argmax()] for i, t in enumerate(chosen)])
        rows[name] = {
            "accuracy": accuracy(predicted, gold),
            "macro_f1": macro_f1(predicted, gold),
            "routing_accuracy": selection_accuracy(certainty, gold, space),
        }
    return rows


def summarize(values: list[float]) -> dict[str, float]:
    arr = np.array(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


def aggregate(cfg, out: Path, records: list[dict[str, Any]], seeds, splits, methods, test_labels) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for split in splits:
        rows: dict[str, dict[str, list[float]]] = {}

        def add(name, metrics):
            for key, value in metrics.items():
                rows.setdefault(name, {}).setdefault(key, []).append(value)

        teacher_seeds = sorted({teacher_seed_of(cfg, s, seeds) for s in seeds})
        routing, reference_rows = {}, [teacher_and_ensemble_rows(cfg, out, split, ts, test_labels) for ts in teacher_seeds]
        for name in [n for n in reference_rows[0] if n.startswith("teacher ")]:
            for found in reference_rows:
                add(name, found[name])
        for r in records:
            if r["kind"] == "oracle":
                add("oracle (student fine-tuned WITH all labels)", {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]})
        for name in [n for n in reference_rows[0] if not n.startswith("teacher ")]:
            for found in reference_rows:
                add(name, found[name])
                routing.setdefault("mc" if "MC" in name else "deterministic", []).append(found[name]["routing_accuracy"])
        for method in methods:
            strategy = STUDENTS[method][0]
            for r in records:
                if r["kind"] == "student" and r["split"] == split and r["method"] == method:
                    add(f"student: {method}", {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]})
            if strategy in ROUTING_OF and f"student: {method}" in rows:
                rows[f"student: {method}"]["routing_accuracy"] = routing[ROUTING_OF[strategy]]
        table[split] = {name: {k: summarize(v) for k, v in metrics.items()} for name, metrics in rows.items()}
    return table


def teacher_seed_of(cfg, seed: int, seeds) -> int:
    return seed if cfg["per_seed_teachers"] else seeds[0]


def fmt(stat: Optional[dict[str, float]], pct: bool = True) -> str:
    if stat is None:
        return "—"
    scale = 100 if pct else 1
    if stat["n"] > 1:
        return f"{stat['mean'] * scale:.1f} ± {stat['std'] * scale:.1f}"
    return f"{stat['mean'] * scale:.1f}"


def markdown(table: dict[str, Any], header: str) -> str:
    lines = [header, ""]
    for split, rows in table.items():
        lines += [f"### Teachers split {split}", "",
                  "| method | test accuracy % | test macro-F1 % | routing accuracy % | n |",
                  "|---|---|---|---|---|"]
        for name, metrics in rows.items():
            n = metrics["accuracy"]["n"]
            lines.append(f"| {name} | {fmt(metrics['accuracy'])} | {fmt(metrics['macro_f1'])} | "
                         f"{fmt(metrics.get('routing_accuracy'))} | {n} |")
        lines.append("")
    return "\n".join(lines)


def chart(table: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(7 * len(table), 6.5), sharex=True, squeeze=False)
    for ax, (split, rows) in zip(axes[0], table.items()):
        names = [n for n in rows if not n.startswith("teacher ")]
        means = [rows[n]["accuracy"]["mean"] * 100 for n in names]
        stds = [rows[n]["accuracy"]["std"] * 100 for n in names]
        colors = ["#444444" if n.startswith("oracle") else "#8da0cb" if n.startswith("ensemble")
                  else "#fc8d62" if "muki" in n else "#66c2a5" for n in names]
        y = np.arange(len(names))[::-1]
        ax.barh(y, means, xerr=stds, color=colors, capsize=3)
        for yi, m, sd in zip(y, means, stds):
            ax.text(m + sd + 1, yi, f"{m:.1f}", va="center", fontsize=8)
        ax.set_yticks(y, [n.replace("student: ", "") for n in names], fontsize=9)
        oracle = next((rows[n]["accuracy"]["mean"] * 100 for n in names if n.startswith("oracle")), None)
        if oracle is not None:
            ax.axvline(oracle, color="#444444", linestyle="--", linewidth=1)
        ax.set_xlim(0, 100)
        ax.set_xlabel("test accuracy % (mean ± std over seeds)")
        ax.set_title(f"teachers {split}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="reduced")
    parser.add_argument("--output_dir", default=None, help="default: outputs/bench/<config>")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--methods", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--no_oracle", action="store_true")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel jobs (default: CPU count // threads on CPU, 1 on a GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker on CPU")
    opts = parser.parse_args(argv)
    cfg = CONFIGS[opts.config]
    out = Path(opts.output_dir or REPO / "outputs" / "bench" / opts.config).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workers = opts.workers or (1 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // opts.threads))
    started = time.perf_counter()
    print(f"config {opts.config}: {cfg}\nsignal cache: {HAS_SIGNAL_CACHE}; workers {workers}; output {out}", flush=True)

    _, _, test = load_data(cfg)
    test_labels = list(test["label"])
    subsets = {split: partition_labels(test_labels, split) for split in opts.splits}
    teacher_sets = sorted({(split, teacher_seed_of(cfg, s, opts.seeds)) for split in opts.splits for s in opts.seeds})

    phases = [
        # 1: teachers and oracles (independent of each other)
        [("teacher", dict(split=sp, teacher_seed=ts, index=i)) for sp, ts in teacher_sets for i in range(len(subsets[sp]))]
        + ([] if opts.no_oracle else [("oracle", dict(seed=s)) for s in opts.seeds]),
        # 2: teacher signals on the test rows, and one MUKI student per teacher set (fills its signal cache)
        [("signals", dict(split=sp, teacher_seed=ts, index=i)) for sp, ts in teacher_sets for i in range(len(subsets[sp]))],
        # 3: every student
        [("student", dict(split=sp, seed=s, teacher_seed=teacher_seed_of(cfg, s, opts.seeds), method=m))
         for sp in opts.splits for s in opts.seeds for m in opts.methods],
    ]
    if HAS_SIGNAL_CACHE:  # warm each teacher set's cache once before students read it in parallel
        warm = [job for job in phases[2] if job[1]["method"] == opts.methods[-1] and job[1]["seed"] == teacher_seed_of(cfg, job[1]["seed"], opts.seeds)]
        warm = list({(j[1]["split"], j[1]["teacher_seed"]): j for j in warm}.values())
        phases[1] = warm + phases[1]
        phases[2] = [job for job in phases[2] if job not in warm]

    records, phase_seconds = [], []
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(opts.threads,)) as pool:
        for phase in phases:
            t0 = time.perf_counter()
            running = [pool.submit(run_job, opts.config, str(out), kind, params) for kind, params in phase]
            records += [job.result() for job in running]
            phase_seconds.append(round(time.perf_counter() - t0, 1))

    table = aggregate(cfg, out, records, opts.seeds, opts.splits, opts.methods, test_labels)
    wall = round(time.perf_counter() - started, 1)
    hardware = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "workers": workers,
        "threads_per_worker": opts.threads,
    }
    result = {
        "config": opts.config,
        "settings": cfg,
        "splits": opts.splits,
        "seeds": opts.seeds,
        "num_test": len(test_labels),
        "signal_cache": HAS_SIGNAL_CACHE,
        "hardware": hardware,
        "wall_seconds": wall,
        "phase_seconds": phase_seconds,
        "table": table,
        "records": records,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    header = (f"## {opts.config} configuration ({cfg['model'].split('/')[-1]}, {cfg['max_length']} tokens, "
              f"{len(test_labels)} test rows, seeds {opts.seeds}; wall time {wall / 60:.1f} min)")
    (out / "results.md").write_text(markdown(table, header) + "\n")
    chart(table, out / "results.png", f"debian_sections20, {opts.config} configuration ({cfg['model'].split('/')[-1]})")
    print(markdown(table, header))
    print(f"wrote {out / 'results.json'}, results.md, results.png; wall time {wall} s (phases {phase_seconds})")
    return result


if __name__ == "__main__":
    main()
