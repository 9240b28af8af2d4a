"""The main job end to end on a laptop CPU: two teachers -> one label-free student (``make demo``).

1. Fine-tunes two paraphrase-MiniLM-L3-v2 teachers on debian_sections20 (embedded in data/), one on
   the first 10 sections (sorted names), one on the other 10, 30 labelled rows per class, 48 tokens,
   with examples/train_teachers.py. They are cached in outputs/demo/teachers: a second run reuses them.
2. Integrates them WITHOUT labels into a paraphrase-MiniLM-L3-v2 student over all 20 sections, once
   with MUKI (Monte-Carlo-dropout certainty, K=8, soft selection) and once with vanilla KD. Margin
   re-weighting is OFF here: with teachers this small it costs the student ~7 points (see
   docs/results.md); set margin_reweighting=True for the authors' recipe. The teacher signals of the
   training rows are computed once and cached (outputs/demo/signal_cache): both students, and later
   runs, reuse them.
3. Prints a small table on a class-balanced test subset (15 rows per class, 293 rows) and writes it
   to outputs/demo/results.json.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python examples/demo.py

Measured on this project's 2-core CPU machine (no GPU, OMP_NUM_THREADS=1): `make demo` in a fresh
clone took 4 min 49 s including the venv and model set-up (the demo itself 190 s: teachers 2 x ~45 s,
signal caches, two students); a second run reuses the cached teachers and signals. Result (seed 0):
teachers 83.3% / 75.5% on their own classes; MUKI student 50.2% accuracy (43.5% macro-F1, teacher
selection 77.1%), vanilla KD student 50.2% (45.2%), on all 20 classes. (The MUKI student's test
signals are cached since evaluation sets are cached too; they come from other MC draws than the
earlier live evaluation, which measured a selection of 76.1%.) These are small-data numbers (600 training rows,
2 epochs): they show the pipeline working; benchmarks/quality.py and docs/results.md hold the
real comparison.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_teachers  # noqa: E402  (examples/train_teachers.py)
from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher  # noqa: E402
from ki_trainer.data import cap_per_class, load_debian_sections  # noqa: E402
from ki_trainer.metrics import accuracy, macro_f1  # noqa: E402
from ki_trainer.pretrained import resolve_model  # noqa: E402

MODEL = "sentence-transformers/paraphrase-MiniLM-L3-v2"
OUT = REPO / "outputs" / "demo"
PER_CLASS, TEST_PER_CLASS, MAX_LENGTH, MC_SAMPLES = 30, 15, 48, 8
COMMON = dict(per_device_train_batch_size=16, learning_rate=2e-4, save_strategy="no", report_to="none", seed=0)


def train_demo_teachers() -> list[Teacher]:
    summary = train_teachers.main([
        "--model_name_or_path", MODEL, "--split_spec", "2x10", "--max_train_per_class", str(PER_CLASS),
        "--max_length", str(MAX_LENGTH), "--num_train_epochs", "4", "--eval_strategy", "no",
        "--output_dir", str(OUT / "teachers"), "--disable_tqdm", "true",
        *[f"--{k}={v}" for k, v in COMMON.items()],
    ])  # fmt: skip
    return [Teacher(str(OUT / "teachers" / record["path"])) for record in summary["teachers"]]


@torch.no_grad()
def teacher_on_own_classes(teacher: Teacher, test) -> dict[str, float]:
    """A teacher alone, on the test rows of its own classes (what it was trained for)."""
    rows = test.filter(lambda batch: [label in teacher.labels for label in batch["label"]], batched=True)
    tokenizer = train_teachers.AutoTokenizer.from_pretrained(teacher.model.name_or_path)
    teacher.model.eval()
    batch = tokenizer(list(rows["text"]), truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
    predicted = teacher.model(**batch).logits.argmax(-1).numpy()
    gold = np.array([teacher.labels.index(label) for label in rows["label"]])
    return {"accuracy": accuracy(predicted, gold), "macro_f1": macro_f1(predicted, gold)}


def integrate(strategy: str, teachers: list[Teacher], unlabeled, test) -> dict[str, float]:
    args = KnowledgeIntegrationConfig(
        output_dir=str(OUT / f"student_{strategy}"),
        strategy=strategy,
        margin_reweighting=False,
        mc_samples=MC_SAMPLES,
        max_length=MAX_LENGTH,
        num_train_epochs=2,
        teacher_signals="cached",
        signal_cache_dir=str(OUT / "signal_cache"),
        logging_steps=25,
        **COMMON,
    )
    set_seed(args.seed)  # before the student's new head is initialised
    trainer = KnowledgeIntegrationTrainer(model=str(resolve_model(MODEL)), args=args, teachers=teachers, train_dataset=unlabeled)
    trainer.train()
    return trainer.evaluate(test, metric_key_prefix="test")


def main() -> dict:
    start = time.perf_counter()
    data = load_debian_sections()
    teachers = train_demo_teachers()
    unlabeled = cap_per_class(data["train"], PER_CLASS, seed=0).remove_columns(["label", "split"])  # no labels
    test = cap_per_class(data["test"], TEST_PER_CLASS, seed=0)

    rows = {f"teacher {i + 1} ({t.labels[0]}..{t.labels[-1]}, own classes)": teacher_on_own_classes(t, test) for i, t in enumerate(teachers)}
    for strategy, name in (("muki", "student: MUKI (soft, MC K=8)"), ("vanilla_kd", "student: vanilla KD")):
        metrics = integrate(strategy, teachers, unlabeled, test)
        rows[name] = {key: metrics[f"test_{key}"] for key in ("accuracy", "macro_f1", "teacher_selection_accuracy") if f"test_{key}" in metrics}

    seconds = round(time.perf_counter() - start, 1)
    print(f"\ndebian_sections20, 2 teachers x 10 sections, {len(unlabeled)} unlabeled training rows, {len(test)} test rows")
    print(f"{'':58s} {'accuracy':>9s} {'macro-F1':>9s} {'selection':>9s}")
    for name, m in rows.items():
        cells = [f"{100 * m[k]:8.1f}%" if k in m else f"{'—':>9s}" for k in ("accuracy", "macro_f1", "teacher_selection_accuracy")]
        print(f"{name:58s} {' '.join(cells)}")
    print(f"(teachers: accuracy on the test rows of their own 10 classes; students: on all 20; selection: share of "
          f"test rows whose most certain teacher owns the gold class)\nwall time {seconds} s")
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"model": MODEL, "num_unlabeled": len(unlabeled), "num_test": len(test), "wall_seconds": seconds, "rows": rows}
    (OUT / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
