"""``ki-trainer demo``: the main job end to end on a laptop CPU, two teachers -> one label-free student.

1. Fine-tunes two paraphrase-MiniLM-L3-v2 teachers on debian_sections20 (shipped with the package),
   one on the first 10 sections (sorted names), one on the other 10, 30 labelled rows per class, 48
   tokens, with ``ki-trainer train-teachers``. They are cached in <output_dir>/teachers: a second run
   reuses them.
2. Integrates them WITHOUT labels into a paraphrase-MiniLM-L3-v2 student over all 20 sections: with
   MUKI as published (Monte-Carlo-dropout certainty, K=8, soft selection; dropout sampled in the top layer,
   which picks the same teachers as full MC dropout on the demo's data: docs/performance.md), with MUKI routed
   by the ``relative_mahalanobis`` router (docs/routing.md), the same started from the teachers'
   averaged weights (``student_init="teacher_average"``), and with vanilla KD. Margin
   re-weighting is OFF here: with teachers this small it costs the student ~7 points (see
   docs/results.md); set margin_reweighting=True for the authors' recipe. The teacher signals of the
   training rows are computed once and cached (<output_dir>/signal_cache): the students, and later
   runs, reuse them.
3. Trains the oracle for reference: the same student model fine-tuned WITH the labels of the same rows
   (the only place the demo uses training labels; cached in <output_dir>/oracle).
4. Prints a small table on a class-balanced test subset (15 rows per class, 293 rows) and writes it
   to <output_dir>/results.json.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 ki-trainer demo      # or: make demo

Measured with ``make demo`` in a fresh clone on this project's 2-core CPU machine (no GPU, OMP_NUM_THREADS=2,
seed 0, other jobs paused; see README.md for the wall time): teachers 83.3% / 75.5% on their own classes; on all 20
classes the MUKI student (as published, MC dropout in the top layer) 50.9%, MUKI + relative_mahalanobis router
53.6%, the same from the teachers' averaged weights 59.4%, vanilla KD 50.2%, the oracle (WITH labels) 61.1%; routed
teacher ensembles 67.2% (MC entropy) and 67.6% (relative Mahalanobis). With ``--seed 1``: 49.8%, 57.0%, 58.0%,
54.6% and 60.8% (same order of the label-free rows against vanilla KD). A second run reuses the cached teachers,
signals and oracle. These are small-data numbers (600 unlabeled training rows, 2 epochs): they show the pipeline
working; benchmarks/routing.py, benchmarks/quality.py, docs/routing.md and docs/results.md hold
the real comparison.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..console import hide_progress_bars, phase
from .arguments import CommandParser, is_help_all

MODEL = "sentence-transformers/paraphrase-MiniLM-L3-v2"
METRICS = ("accuracy", "macro_f1", "teacher_selection_accuracy", "routed_teacher_accuracy")
ORACLE = "oracle: the same student trained WITH the labels (reference)"

DESCRIPTION = """\
The main job end to end, on a laptop CPU in a few minutes: fine-tune two teachers on disjoint halves
of the 20 debian_sections20 classes, merge them WITHOUT labels into one student over all 20 classes
(MUKI as published, MUKI with the relative_mahalanobis router, the same from the teachers' averaged weights,
vanilla KD), train the oracle (the same student WITH the labels) for reference, and print a small results
table with the routed teacher ensemble (also written to <output_dir>/results.json).
Teachers and teacher signals are cached in <output_dir>: a second run reuses them.

  ki-trainer demo
  ki-trainer demo --output_dir outputs/demo --num_train_epochs 3"""


@dataclass
class DemoArguments:
    """The demo's knobs (defaults: the measured README run)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Teachers, signal cache, students, results.json."})
    model: str = field(default=MODEL, metadata={"help": "Base model of the teachers and the student (Hub id or directory)."})
    per_class: int = field(default=30, metadata={"help": "Labelled rows per class for the teachers = unlabeled rows per class for the student."})
    test_per_class: int = field(default=15, metadata={"help": "Test rows per class in the results table."})
    max_length: int = field(default=48, metadata={"help": "Truncation length (tokens)."})
    mc_samples: int = field(default=8, metadata={"help": "Monte-Carlo dropout passes per teacher (MUKI)."})
    mc_top_layers: int = field(default=1, metadata={
        "help": "MUKI's MC dropout sampled only in each teacher's last m layers (the lower ones run once); 0: in every "
                "layer. On the demo's data m=1 picks the same teachers as full MC dropout (docs/performance.md)."})
    teacher_epochs: float = field(default=4, metadata={"help": "Epochs of teacher fine-tuning."})
    num_train_epochs: float = field(default=2, metadata={"help": "Epochs of student training."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size of teachers and students."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of teachers and students."})
    seed: int = field(default=0, metadata={"help": "Seed for data subsets, teachers and students."})
    disable_tqdm: bool = field(default=True, metadata={"help": "Hide the progress bars (phase banners stay)."})

    def __post_init__(self) -> None:  # named before minutes of teacher training, not after
        from ..errors import UsageError

        if self.mc_top_layers < 0:
            raise UsageError(f"--mc_top_layers {self.mc_top_layers}: give the number of top layers to sample "
                             "dropout in (>= 1), or 0 for every layer.")


def _common(demo: DemoArguments) -> dict[str, Any]:
    return dict(per_device_train_batch_size=demo.per_device_train_batch_size, learning_rate=demo.learning_rate,
                save_strategy="no", report_to="none", seed=demo.seed, disable_tqdm=demo.disable_tqdm)


def _train_classifiers(demo: DemoArguments, folder: str, split_spec: str, epochs: float) -> list:
    """``train-teachers`` on ``split_spec`` (one classifier per label block), cached in <output_dir>/<folder>."""
    from ..teacher import Teacher
    from . import train_teachers

    out = Path(demo.output_dir) / folder
    summary = train_teachers.main([
        "--model_name_or_path", demo.model, "--split_spec", split_spec, "--max_train_per_class", str(demo.per_class),
        "--max_length", str(demo.max_length), "--num_train_epochs", str(epochs), "--eval_strategy", "no",
        "--output_dir", str(out), *[f"--{k}={v}" for k, v in _common(demo).items()],
    ])  # fmt: skip
    return [Teacher(str(out / record["path"])) for record in summary["teachers"]]


def train_demo_teachers(demo: DemoArguments) -> list:
    """Two teachers on the two halves of the sorted classes (cached in <output_dir>/teachers)."""
    return _train_classifiers(demo, "teachers", "2x10", demo.teacher_epochs)


def train_oracle(demo: DemoArguments) -> Any:
    """The reference a label-free student is measured against: the student model fine-tuned WITH the gold labels of
    the same training rows, same epochs and learning rate (``train-teachers --split_spec 1x20``, cached)."""
    return _train_classifiers(demo, "oracle", "1x20", demo.num_train_epochs)[0]


@torch.no_grad()
def teacher_on_own_classes(teacher, test, max_length: int) -> dict[str, float]:
    """A teacher alone, on the test rows of its own classes (what it was trained for)."""
    from transformers import AutoTokenizer

    from ..metrics import accuracy, macro_f1

    rows = test.filter(lambda batch: [label in teacher.labels for label in batch["label"]], batched=True)
    tokenizer = AutoTokenizer.from_pretrained(teacher.model.name_or_path)
    teacher.model.eval()
    batch = tokenizer(list(rows["text"]), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    predicted = teacher.model(**batch).logits.argmax(-1).numpy()
    gold = np.array([teacher.labels.index(label) for label in rows["label"]])
    return {"accuracy": accuracy(predicted, gold), "macro_f1": macro_f1(predicted, gold)}


def integrate_student(demo: DemoArguments, strategy: str, teachers: list, unlabeled, test, **options: Any) -> dict[str, float]:
    """Train one label-free student with ``strategy`` and return its test metrics (``test_`` prefix dropped)."""
    from transformers import set_seed

    from ..config import KnowledgeIntegrationConfig
    from ..pretrained import resolve_model
    from ..trainer import KnowledgeIntegrationTrainer

    out = Path(demo.output_dir)
    settings = dict(strategy=strategy, margin_reweighting=False, mc_samples=demo.mc_samples,
                    mc_top_layers=demo.mc_top_layers or None, max_length=demo.max_length,
                    num_train_epochs=demo.num_train_epochs, signal_source="cached",
                    signal_cache_dir=str(out / "signal_cache"), logging_steps=25,
                    per_device_eval_batch_size=64,  # the teacher signals are precomputed in batches of 64 rows, not 8
                    **_common(demo))
    settings.update(options)
    name = settings.pop("run_name", strategy)
    args = KnowledgeIntegrationConfig(output_dir=str(out / f"student_{name}"), **settings)
    set_seed(args.seed)  # before the student's new head is initialised
    trainer = KnowledgeIntegrationTrainer(model=str(resolve_model(demo.model)), args=args, teachers=teachers,
                                          train_dataset=unlabeled)
    trainer.train()
    metrics = trainer.evaluate(test, metric_key_prefix="test")
    return {key: metrics[f"test_{key}"] for key in METRICS if f"test_{key}" in metrics}


# The students of the results table: (row name, strategy, extra KnowledgeIntegrationConfig options).
# A new row is one more entry here.
STUDENTS: list[tuple[str, str, dict[str, Any]]] = [
    ("student: MUKI (soft, MC K={mc_samples}, {mc_layers})", "muki", {"router": "mc_entropy"}),  # as published
    ("student: MUKI + relative_mahalanobis router", "muki", {"router": "relative_mahalanobis", "run_name": "muki_rmd"}),
    ("student: MUKI + relative_mahalanobis, teacher-average start", "muki",
     {"router": "relative_mahalanobis", "student_init": "teacher_average", "run_name": "muki_rmd_avg"}),
    ("student: vanilla KD", "vanilla_kd", {}),
]


def mc_layers(demo: DemoArguments) -> str:
    """Where MUKI's dropout is sampled, for the row name: ``"top 1 layer"`` or ``"all layers"``."""
    m = demo.mc_top_layers
    return f"top {m} layer{'s' if m > 1 else ''}" if m else "all layers"


def demo_rows(demo: DemoArguments, teachers: list, unlabeled, test,
              students: Sequence[tuple[str, str, dict[str, Any]]] = STUDENTS,
              train_student: Optional[Callable[..., dict[str, float]]] = None,
              oracle: Optional[Callable[[DemoArguments], Any]] = train_oracle) -> dict[str, dict[str, float]]:
    """Every row of the results table: each teacher on its own classes, each label-free student on all classes,
    then the oracle (the student trained with labels) on all classes (``oracle=None`` leaves it out)."""
    train_student = train_student or integrate_student
    rows = {}
    for i, teacher in enumerate(teachers):
        rows[f"teacher {i + 1} ({teacher.labels[0]}..{teacher.labels[-1]}, own classes)"] = teacher_on_own_classes(
            teacher, test, demo.max_length
        )
    for n, (name, strategy, options) in enumerate(students, start=1):
        name = name.format(**vars(demo), mc_layers=mc_layers(demo))
        with phase(f"training student {n}/{len(students)}: {name.removeprefix('student: ')}"):
            rows[name] = train_student(demo, strategy, teachers, unlabeled, test, **options)
    if oracle is not None:
        with phase("training the oracle (the student WITH labels; cached after the first run)"):
            rows[ORACLE] = teacher_on_own_classes(oracle(demo), test, demo.max_length)
    return rows


def print_table(rows: dict[str, dict[str, float]], num_unlabeled: int, num_test: int, seconds: float) -> None:
    print(f"\ndebian_sections20, 2 teachers x 10 sections, {num_unlabeled} unlabeled training rows, {num_test} test rows")
    print(f"{'':62s} {'accuracy':>9s} {'macro-F1':>9s} {'selection':>9s} {'routed':>9s}")
    for name, m in rows.items():
        cells = [f"{100 * m[k]:8.1f}%" if k in m else f"{'—':>9s}" for k in METRICS]
        print(f"{name:62s} {' '.join(cells)}")
    print(f"(teachers: accuracy on the test rows of their own 10 classes; students and oracle: on all 20; selection: "
          f"share of test rows whose most competent teacher (by the student's router) owns the gold class; routed: "
          f"accuracy of that teacher's prediction, i.e. of the routed teacher ensemble the student compresses)\n"
          f"wall time {seconds} s")


def run(demo: DemoArguments) -> dict[str, Any]:
    """The whole demo; returns (and writes to <output_dir>/results.json) the results table."""
    from ..data import cap_per_class, load_debian_sections

    start = time.perf_counter()
    hide_progress_bars(demo.disable_tqdm)
    data = load_debian_sections()
    with phase("training 2 teachers (cached after the first run)"):
        teachers = train_demo_teachers(demo)
    unlabeled = cap_per_class(data["train"], demo.per_class, seed=demo.seed).remove_columns(["label", "split"])  # no labels
    test = cap_per_class(data["test"], demo.test_per_class, seed=demo.seed)
    rows = demo_rows(demo, teachers, unlabeled, test)

    seconds = round(time.perf_counter() - start, 1)
    print_table(rows, len(unlabeled), len(test), seconds)
    out = Path(demo.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": demo.model, "num_unlabeled": len(unlabeled), "num_test": len(test), "wall_seconds": seconds,
              "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return result


def build_parser(full_help: bool = False, prog: str = "ki-trainer demo") -> CommandParser:
    return CommandParser((DemoArguments,), prog=prog, description=DESCRIPTION,
                         groups=[("demo options", list(DemoArguments.__dataclass_fields__))], full_help=full_help)


def main(argv: Optional[Sequence[str]] = None, prog: str = "ki-trainer demo") -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    (demo,) = build_parser(is_help_all(argv), prog).parse(argv)
    return run(demo)
