"""Quality benchmark: knowledge integration on debian_sections20 against its references.

One command reproduces the whole table of a configuration. A configuration runs one or more
*settings*; a setting names its teachers (the base model each starts from and the language of the
text it learns from), how the 20 classes are carved among them, the student model, and the
languages of the unlabeled transfer text (which are also the evaluation languages):

* ``reduced`` / ``full`` / ``smoke``: homogeneous English teachers, splits "2x10" (10 | 10 classes
  by sorted name) and "4x5";
* ``mixed``: heterogeneous and cross-lingual teachers (``MIXED_SETTINGS`` below), on the packages
  that have an Italian translation, so every language reads the same rows: a MiniLM-L6 pair, a
  MiniLM-L6 + MPNet pair, an English MiniLM-L6 + Italian multilingual-e5-small pair on the two class
  halves, and all-classes teachers per language.

Every setting gets these rows:

* each teacher alone, on the test rows of its own classes (per evaluation language);
* the oracle: the student architecture fine-tuned WITH all labels on the transfer text (plain ``Trainer``);
* the ensemble at inference: per example, the prediction of the most certain teacher, routed by
  MC-dropout certainty and by deterministic-entropy certainty (what a student tries to compress);
* label-free students: vanilla KD, UHC, entropy selection, MUKI hard and MUKI soft, the certainty
  strategies with and without margin re-weighting.

Accuracy and macro-F1 are mean ± std over the seeds (student / oracle training seeds), pooled over
the evaluation languages, with per-language accuracy beside them when there are several; routing
accuracy is the share of test rows whose most certain teacher owns the gold class (when teachers own
different classes); language routing is the share routed to a teacher trained on the row's language
(when teachers read different languages). Writes
``results.json``, ``results.md`` and ``results.png`` to ``--output_dir``; every finished job is
recorded under ``<output_dir>/records`` so an interrupted run resumes where it stopped.

    # CPU, ~2-core machine: see docs/results.md for the measured wall time
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/quality.py --config reduced
    # GPU (all-MiniLM-L6-v2, 128 tokens, 4 epochs, bs 32, lr 5e-5, MC K=16, teachers retrained per seed)
    HF_HUB_OFFLINE=1 python benchmarks/quality.py --config full
    # heterogeneous and cross-lingual teachers (CPU-sized: 20 rows/class, 48 tokens, MC K=8 in the top 2 layers)
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/quality.py --config mixed

Sizes (``CONFIGS`` below): ``reduced`` caps the data per class (train 30/class = 600 rows that the
teachers learn from with labels and the students read WITHOUT labels; test 30/class = 542 rows),
truncates at 48 tokens, uses paraphrase-MiniLM-L3-v2, MC K=8, and trains one teacher set (seed 0)
shared by the 3 student seeds; ``full`` uses all data. Students read cached teacher signals
(``signal_source="cached"``) when the installed ki_trainer offers it: computed once per teacher
set and reused by every strategy and seed.

Students are evaluated by a plain forward pass over the test rows (no teacher queries), so the
per-student cost is training only; teacher signals on the test rows are computed once per teacher
set (for the teacher and ensemble rows and the routing accuracies).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import functools
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
from ki_trainer.metrics import accuracy, macro_f1, selection_accuracy  # noqa: E402
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

MINILM_L6 = "sentence-transformers/all-MiniLM-L6-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"
E5_SMALL = "intfloat/multilingual-e5-small"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One knowledge-integration problem: who teaches which classes in which language, and who learns.

    ``split`` is a label partition spec ("2x10": 10 | 10 classes by sorted name); "1x20" gives EVERY
    teacher all 20 classes. ``teachers`` holds, per teacher, the base model it is fine-tuned from
    and the language of its training text. The student reads the unlabeled training rows in every
    ``transfer`` language and is evaluated on the test rows in each of them.
    """

    split: str
    teachers: tuple[tuple[str, str], ...]
    student: str
    transfer: tuple[str, ...] = ("en",)
    methods: Optional[tuple[str, ...]] = None  # None: every method asked for on the command line

    def describe(self) -> str:
        teachers = " | ".join(f"{model.split('/')[-1]} ({language})" for model, language in self.teachers)
        return (f"teachers {teachers} on split {self.split}; student {self.student.split('/')[-1]}; "
                f"unlabeled text and evaluation in {'+'.join(self.transfer)}")


def homogeneous_settings(model: str) -> dict[str, Setting]:
    """The 2x10 and 4x5 splits with identical English teachers (setting name = split)."""
    return {split: Setting(split, ((model, "en"),) * int(split.split("x")[0]), model) for split in ("2x10", "4x5")}


_KD_BASELINES_AND_MUKI = ("vanilla_kd", "uhc", "muki_hard", "muki_soft", "muki_hard+std", "muki_soft+std")
_CROSS_LINGUAL_METHODS = ("vanilla_kd", "uhc", "muki_soft", "muki_hard+std")  # e5 students cost ~3x: fewer rows
MIXED_SETTINGS: dict[str, Setting] = {
    "homogeneous": Setting("2x10", ((MINILM_L6, "en"), (MINILM_L6, "en")), MINILM_L6, methods=_KD_BASELINES_AND_MUKI),
    "heterogeneous": Setting("2x10", ((MINILM_L6, "en"), (MPNET, "en")), MINILM_L6, methods=_KD_BASELINES_AND_MUKI),
    "cross-lingual-halves": Setting(
        "2x10", ((MINILM_L6, "en"), (E5_SMALL, "it")), E5_SMALL, ("en", "it"), methods=_CROSS_LINGUAL_METHODS
    ),
    "cross-lingual-languages": Setting(
        "1x20", ((MINILM_L6, "en"), (E5_SMALL, "it")), E5_SMALL, ("en", "it"), methods=_CROSS_LINGUAL_METHODS
    ),
}

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
        model=MINILM_L6,
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
    # Issue "heterogeneous and cross-lingual teachers", sized for a 2-core CPU (see docs/results.md).
    # MC dropout samples only the top 2 layers (lower layers run once): benchmarks/top_layer_routing.py
    # measured the same routing as full MC on real teachers at a fraction of the cost.
    "mixed": dict(
        model=MINILM_L6,
        settings=MIXED_SETTINGS,
        parallel_languages=("en", "it"),
        max_length=48,
        train_per_class=20,
        test_per_class=20,
        teacher_epochs=4,
        epochs=2,
        batch_size=16,
        learning_rate=1e-4,
        mc_samples=8,
        mc_top_layers=2,
        per_seed_teachers=False,
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
# the mixed settings at smoke size: checks the heterogeneous / cross-lingual code paths in ~6 CPU minutes
CONFIGS["mixed-smoke"] = dict(CONFIGS["mixed"], max_length=24, train_per_class=3, test_per_class=2, teacher_epochs=1,
                              epochs=1, mc_samples=2, mc_top_layers=1)
# the mixed settings with teachers trained 3x longer: are the students weak because the teachers are flat?
CONFIGS["mixed-long-teachers"] = dict(CONFIGS["mixed"], teacher_epochs=12)
SEEDS = (0, 1, 2)
DATA_SEED = 0  # which rows the per-class caps keep: fixed, so every run sees the same data

# name -> (strategy, selection, margin re-weighting, margin weights divided by their batch mean,
#          certainty_normalization)
STUDENTS: dict[str, tuple[str, str, bool, bool, str]] = {
    "vanilla_kd": ("vanilla_kd", "soft", False, False, "none"),
    "uhc": ("uhc", "soft", False, False, "none"),
    "entropy_soft": ("entropy", "soft", False, False, "none"),
    "entropy_soft+margin": ("entropy", "soft", True, False, "none"),
    "muki_hard": ("muki", "hard", False, False, "none"),
    "muki_hard+margin": ("muki", "hard", True, False, "none"),
    "muki_soft": ("muki", "soft", False, False, "none"),
    "muki_soft+margin": ("muki", "soft", True, False, "none"),
    # not in the paper: the same margin weights renormalised to mean 1 per batch (normalize_margin_weights)
    "muki_soft+margin_norm": ("muki", "soft", True, True, "none"),
    # not in the paper: each teacher's certainty standardized over the training rows (certainty_normalization)
    "muki_hard+std": ("muki", "hard", False, False, "standardize"),
    "muki_soft+std": ("muki", "soft", False, False, "standardize"),
}
ROUTING_OF = {"entropy": "deterministic", "muki": "mc"}
STANDARDIZED_ENSEMBLE = "ensemble routed by standardized MC certainty"
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(KnowledgeIntegrationConfig)}
HAS_SIGNAL_CACHE = bool({"signal_source", "teacher_signals"} & _CONFIG_FIELDS)
SIGNAL_FLAG = "signal_source" if "signal_source" in _CONFIG_FIELDS else "teacher_signals"  # older installations


def settings_of(cfg: dict[str, Any]) -> dict[str, Setting]:
    return cfg.get("settings") or homogeneous_settings(cfg["model"])


def teacher_labels(setting: Setting, labels) -> list[list[str]]:
    """Each teacher's own label subset (every teacher gets all classes when the split has one subset)."""
    subsets = partition_labels(labels, setting.split)
    if len(subsets) == 1:
        return subsets * len(setting.teachers)
    if len(subsets) != len(setting.teachers):
        raise ValueError(f"Split {setting.split} makes {len(subsets)} label subsets for {len(setting.teachers)} teachers.")
    return subsets


def short(model: str) -> str:
    return model.split("/")[-1]


# ---------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def _kept_ids(cap_train: Optional[int], cap_test: Optional[int], parallel: tuple[str, ...]) -> dict[str, frozenset]:
    """Ids of the rows every language uses: rows translated into all ``parallel`` languages, capped per class."""
    english = load_debian_sections()
    kept = {}
    for split, cap in (("train", cap_train), ("val", None), ("test", cap_test)):
        rows = english[split]
        for language in parallel:
            if language != "en":
                translated = set(load_debian_sections(split=split, language=language)["id"])
                rows = rows.select([i for i, id_ in enumerate(rows["id"]) if id_ in translated])
        kept[split] = frozenset(cap_per_class(rows, cap, seed=DATA_SEED)["id"])
    return kept


def load_data(cfg: dict[str, Any], language: str = "en"):
    """(train rows the teachers/oracle learn from and students read unlabeled, val, test) in ``language``.

    Every language holds the same packages (the same ids), chosen on the English rows.
    """
    kept = _kept_ids(cfg["train_per_class"], cfg["test_per_class"], tuple(cfg.get("parallel_languages", ())))
    data = load_debian_sections(language=language)
    out = []
    for split in ("train", "val", "test"):
        rows = data[split]
        keep = [i for i, id_ in enumerate(rows["id"]) if id_ in kept[split]]
        if len(keep) != len(kept[split]):
            raise ValueError(f"{len(kept[split]) - len(keep)} {split} rows have no {language!r} text; "
                             f"add {language!r} to the configuration's parallel_languages.")
        out.append(rows.select(keep))
    return tuple(out)


def transfer_set(cfg: dict[str, Any], setting: Setting, labeled: bool = False, split: int = 0):
    """The training rows in every transfer language (ids suffixed by language when there are several)."""
    from datasets import concatenate_datasets

    parts = []
    for language in setting.transfer:
        rows = load_data(cfg, language)[split].remove_columns(["split"])
        if not labeled:
            rows = rows.remove_columns(["label"])  # id + text only: no labels reach the trainer
        if len(setting.transfer) > 1:
            rows = rows.map(lambda row, language=language: {"id": f"{row['id']}/{language}"})
        parts.append(rows)
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


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


def score_by_language(predicted: dict[str, np.ndarray], gold: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accuracy and macro-F1 per language and pooled over all languages' rows."""
    per_language = {lang: {"accuracy": accuracy(predicted[lang], gold[lang]), "macro_f1": macro_f1(predicted[lang], gold[lang])}
                    for lang in gold}
    p, g = np.concatenate([predicted[lang] for lang in gold]), np.concatenate(list(gold.values()))
    return {"accuracy": accuracy(p, g), "macro_f1": macro_f1(p, g), "per_language": per_language}


def evaluate_per_language(cfg, model, tokenizer, space: LabelSpace, languages) -> dict[str, Any]:
    """A classifier's accuracy and macro-F1 on the test rows of each language, and pooled."""
    predicted, gold = {}, {}
    for language in languages:
        test = load_data(cfg, language)[2]
        predicted[language] = predict_logits(model, tokenizer, test["text"], cfg["max_length"]).argmax(1)
        gold[language] = np.array(space.encode(test["label"]))
    return score_by_language(predicted, gold)


# ---------------------------------------------------------------------------------------- jobs
def teacher_set_dir(out: Path, setting: str, teacher_seed: int) -> Path:
    return out / "teachers" / setting / f"seed{teacher_seed}"


def load_teachers(out: Path, setting: str, teacher_seed: int) -> list[Teacher]:
    """The setting's fine-tuned teachers, each reading text with the tokenizer saved beside it."""
    paths = sorted(teacher_set_dir(out, setting, teacher_seed).glob("teacher_*"), key=lambda p: int(p.name.split("_")[1]))
    return [Teacher(str(path), tokenizer=str(path)) for path in paths]


def job_teacher(cfg, out: Path, setting: str, teacher_seed: int, index: int) -> dict[str, Any]:
    """Fine-tune (or reuse) teacher ``index`` of ``setting`` with examples/train_teachers.py's code."""
    from transformers import AutoTokenizer, TrainingArguments

    spec = settings_of(cfg)[setting]
    model_name, language = spec.teachers[index]
    train, val, _ = load_data(cfg, language)
    labels = teacher_labels(spec, train["label"])[index]
    model_path = str(resolve_model(model_name))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    teacher_dir = teacher_set_dir(out, setting, teacher_seed) / f"teacher_{index}"
    splits = train_teachers.datasets.DatasetDict({"train": filter_by_labels(train, labels), "val": filter_by_labels(val, labels)})
    encoded = train_teachers.encode(splits, tokenizer, labels, cfg["max_length"])
    args = TrainingArguments(**common_training_args(cfg, teacher_dir.parent / "tmp", teacher_seed, cfg["teacher_epochs"]))
    cached = train_teachers.is_cached(teacher_dir, labels)
    val_accuracy = train_teachers.train_and_evaluate_teacher(
        model_path, labels, encoded, tokenizer, args, teacher_dir, train=not cached
    )
    shutil.rmtree(teacher_dir.parent / "checkpoints", ignore_errors=True)
    return {"model": model_name, "language": language, "labels": labels, "val_accuracy": val_accuracy,
            "num_train": len(encoded["train"]), "cached": cached}


def job_signals(cfg, out: Path, setting: str, teacher_seed: int, index: int, language: str) -> dict[str, Any]:
    """One teacher's deterministic logits, MC and entropy certainty on the test rows of ``language`` (.npz)."""
    _, _, test = load_data(cfg, language)
    teacher = load_teachers(out, setting, teacher_seed)[index].prepare(device(), torch.float32)
    accepted = teacher.accepted_inputs()
    torch.manual_seed(teacher_seed)
    logits, mc = [], []
    texts = test["text"]
    for start in range(0, len(texts), 32):
        batch = teacher.tokenizer(texts[start : start + 32], truncation=True, max_length=cfg["max_length"], padding=True, return_tensors="pt")
        inputs = {k: v.to(device()) for k, v in batch.items() if k in accepted}
        signals = query_teachers([teacher], [inputs], "mc", mc_samples=cfg["mc_samples"], chunk_size=512,
                                 mc_top_layers=cfg.get("mc_top_layers"))
        logits.append(signals.logits[0].cpu())
        mc.append(signals.certainty[:, 0].cpu())
    logits = torch.cat(logits)
    deterministic = certainty_from_logits(logits)
    path = signals_path(out, setting, teacher_seed, index, language)
    np.savez(path, logits=logits.numpy(), mc=torch.cat(mc).numpy(), deterministic=deterministic.numpy())
    return {"path": str(path.relative_to(out))}


def signals_path(out: Path, setting: str, teacher_seed: int, index: int, language: str) -> Path:
    return teacher_set_dir(out, setting, teacher_seed) / f"test_signals_{index}_{language}.npz"


def job_oracle(cfg, out: Path, setting: str, seed: int) -> dict[str, Any]:
    """The setting's student architecture fine-tuned WITH all labels on the transfer text, students' recipe."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    spec = settings_of(cfg)[setting]
    train, val = transfer_set(cfg, spec, labeled=True), transfer_set(cfg, spec, labeled=True, split=1)
    labels = sorted(set(train["label"]))
    model_path = str(resolve_model(spec.student))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model_dir = out / "oracle" / setting / f"seed{seed}"
    encoded = train_teachers.encode(train_teachers.datasets.DatasetDict({"train": train, "val": val}), tokenizer, labels, cfg["max_length"])
    args = TrainingArguments(**common_training_args(cfg, model_dir / "tmp", seed, cfg["epochs"]))
    train_teachers.train_and_evaluate_teacher(model_path, labels, encoded, tokenizer, args, model_dir / "model", train=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir / "model"))
    metrics = evaluate_per_language(cfg, model, tokenizer, LabelSpace([labels]), spec.transfer)
    shutil.rmtree(model_dir, ignore_errors=True)  # only the numbers are needed
    return metrics


def job_student(cfg, out: Path, setting: str, seed: int, teacher_seed: int, method: str) -> dict[str, Any]:
    """A label-free student integrated from the setting's teachers, evaluated by a plain forward pass."""
    from transformers import set_seed

    spec = settings_of(cfg)[setting]
    strategy, selection, margin, normalize, certainty_normalization = STUDENTS[method]
    teachers = load_teachers(out, setting, teacher_seed)
    run_dir = out / "students" / setting / method / f"seed{seed}"
    extra = {}
    if HAS_SIGNAL_CACHE:
        extra = {SIGNAL_FLAG: "cached"} | dict(signal_cache_dir=str(teacher_set_dir(out, setting, teacher_seed) / "signal_cache"))
        if strategy == "muki":
            extra["router"] = "mc_entropy"  # MUKI as published (the cached default would be relative_mahalanobis)
    args = KnowledgeIntegrationConfig(
        **common_training_args(cfg, run_dir, seed, cfg["epochs"]),
        strategy=strategy,
        selection=selection,
        margin_reweighting=margin,
        normalize_margin_weights=normalize,
        certainty_normalization=certainty_normalization,
        mc_samples=cfg["mc_samples"],
        mc_top_layers=cfg.get("mc_top_layers"),
        max_length=cfg["max_length"],
        **extra,
    )
    set_seed(seed)  # the trainer builds the student's new head before Trainer seeds anything
    trainer = KnowledgeIntegrationTrainer(
        model=str(resolve_model(spec.student)), args=args, teachers=teachers, train_dataset=transfer_set(cfg, spec)
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    metrics = evaluate_per_language(cfg, trainer.model, trainer.processing_class, trainer.label_space, spec.transfer)
    shutil.rmtree(run_dir, ignore_errors=True)
    stats = getattr(trainer, "certainty_statistics", None)  # the standardization fitted on the training rows
    if stats is not None:
        metrics["certainty_statistics"] = {"mean": stats[0].tolist(), "std": stats[1].tolist()}
    return {**metrics, "train_seconds": train_seconds, "signal_cache": HAS_SIGNAL_CACHE}


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
def flat_metrics(metrics: dict[str, Any], languages) -> dict[str, float]:
    """Pooled accuracy / macro-F1, plus accuracy per language when there are several languages."""
    flat = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
    if len(languages) > 1:
        flat.update({f"accuracy_{lang}": metrics["per_language"][lang]["accuracy"] for lang in languages})
    return flat


def teacher_and_ensemble_rows(cfg, out: Path, setting: str, teacher_seed: int,
                              standardization: Optional[dict[str, list[float]]] = None) -> dict[str, dict[str, float]]:
    """Rows for each teacher alone and for the ensemble routed by each certainty score.

    ``standardization`` (per-teacher mean/std of MC certainty over the TRAINING rows, as a student
    with ``certainty_normalization="standardize"`` fitted them) adds the ensemble routed by
    standardized MC certainty.
    """
    spec = settings_of(cfg)[setting]
    tests = {language: load_data(cfg, language)[2] for language in spec.transfer}
    subsets = teacher_labels(spec, tests[spec.transfer[0]]["label"])
    n = len(subsets)
    space = LabelSpace(subsets, [f"teacher_{t}" for t in range(n)])
    to_union = [space.teacher_to_union(t).numpy() for t in range(n)]
    signals = {lang: [np.load(signals_path(out, setting, teacher_seed, t, lang)) for t in range(n)] for lang in spec.transfer}
    gold = {lang: np.array(space.encode(test["label"])) for lang, test in tests.items()}

    def scores(predicted: dict[str, np.ndarray], masks: Optional[dict[str, np.ndarray]] = None) -> dict[str, float]:
        masks = masks or {lang: slice(None) for lang in gold}
        kept = score_by_language({lang: predicted[lang][masks[lang]] for lang in gold},
                                 {lang: gold[lang][masks[lang]] for lang in gold})
        return flat_metrics(kept, spec.transfer)

    rows = {}
    for t, own in enumerate(subsets):
        model, language = spec.teachers[t]
        masks = {lang: np.isin(np.array(tests[lang]["label"]), own) for lang in gold}
        predicted = {lang: to_union[t][signals[lang][t]["logits"].argmax(1)] for lang in gold}
        rows[f"teacher {t + 1}/{n}: {short(model)} trained on {language} (own {len(own)} classes)"] = scores(predicted, masks)
    disjoint = sum(len(s) for s in subsets) == space.num_labels
    languages_differ = len({language for _, language in spec.teachers}) > 1
    routings = [("mc", f"ensemble routed by MC certainty (K={cfg['mc_samples']})", None),
                ("deterministic", "ensemble routed by entropy certainty", None)]
    if standardization is not None:
        stats = (np.array(standardization["mean"]), np.array(standardization["std"]))
        routings.append(("mc", STANDARDIZED_ENSEMBLE, stats))
    for source, name, stats in routings:
        certainty = {lang: np.stack([s[source] for s in signals[lang]], axis=1) for lang in gold}
        if stats is not None:
            certainty = {lang: (c - stats[0]) / stats[1] for lang, c in certainty.items()}
        chosen = {lang: c.argmax(1) for lang, c in certainty.items()}
        predicted = {lang: np.array([to_union[t][signals[lang][t]["logits"][i].argmax()] for i, t in enumerate(chosen[lang])])
                     for lang in gold}
        rows[name] = scores(predicted)
        if disjoint:
            pooled = np.concatenate([certainty[lang] for lang in gold])
            rows[name]["routing_accuracy"] = selection_accuracy(pooled, np.concatenate(list(gold.values())), space)
        if languages_differ:
            own_language = np.concatenate([[spec.teachers[t][1] == lang for t in chosen[lang]] for lang in gold])
            rows[name]["language_routing"] = float(own_language.mean())
    return rows


def same_oracle(a: Setting, b: Setting) -> bool:
    """Settings with the same student and transfer text share one oracle (it never sees the teachers)."""
    return (a.student, a.transfer) == (b.student, b.transfer)


def oracle_settings(available: dict[str, Setting], settings: list[str]) -> list[str]:
    """One setting per distinct oracle, in order."""
    chosen: list[str] = []
    for name in settings:
        if not any(same_oracle(available[name], available[c]) for c in chosen):
            chosen.append(name)
    return chosen


def summarize(values: list[float]) -> dict[str, float]:
    arr = np.array(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


def methods_of(setting: Setting, requested: Optional[list[str]]) -> list[str]:
    return list(requested or setting.methods or STUDENTS)


def aggregate(cfg, out: Path, records: list[dict[str, Any]], seeds, settings, requested_methods) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for setting in settings:
        spec = settings_of(cfg)[setting]
        rows: dict[str, dict[str, list[float]]] = {}

        def add(name, metrics):
            for key, value in metrics.items():
                rows.setdefault(name, {}).setdefault(key, []).append(value)

        teacher_seeds = sorted({teacher_seed_of(cfg, s, seeds) for s in seeds})
        fitted = {r["teacher_seed"]: r["certainty_statistics"] for r in records
                  if r["kind"] == "student" and r["setting"] == setting and "certainty_statistics" in r}
        reference_rows = [teacher_and_ensemble_rows(cfg, out, setting, ts, fitted.get(ts)) for ts in teacher_seeds]
        for name in [n for n in reference_rows[0] if n.startswith("teacher ")]:
            for found in reference_rows:
                add(name, found[name])
        for r in records:
            if r["kind"] == "oracle" and same_oracle(settings_of(cfg)[r["setting"]], spec):
                add("oracle (student fine-tuned WITH all labels)", flat_metrics(r, spec.transfer))
        routing: dict[str, dict[str, list[float]]] = {}
        for name in [n for n in reference_rows[0] if not n.startswith("teacher ")]:
            source = "standardized" if name == STANDARDIZED_ENSEMBLE else "mc" if "MC" in name else "deterministic"
            for found in reference_rows:
                add(name, found[name])
                for key in ("routing_accuracy", "language_routing"):
                    if key in found[name]:
                        routing.setdefault(source, {}).setdefault(key, []).append(found[name][key])
        for method in methods_of(spec, requested_methods):
            strategy, standardized = STUDENTS[method][0], STUDENTS[method][4] == "standardize"
            for r in records:
                if r["kind"] == "student" and r["setting"] == setting and r["method"] == method:
                    add(f"student: {method}", flat_metrics(r, spec.transfer))
            if strategy in ROUTING_OF and f"student: {method}" in rows:
                source = "standardized" if standardized else ROUTING_OF[strategy]
                rows[f"student: {method}"].update(routing.get(source, {}))
        table[setting] = {name: {k: summarize(v) for k, v in metrics.items()} for name, metrics in rows.items()}
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


COLUMN_TITLES = {"accuracy": "test accuracy %", "macro_f1": "test macro-F1 %", "routing_accuracy": "routing accuracy %",
                 "language_routing": "routed to own-language teacher %"}


def markdown(table: dict[str, Any], header: str, settings: Optional[dict[str, Setting]] = None) -> str:
    lines = [header, ""]
    for setting, rows in table.items():
        keys = list(dict.fromkeys(k for metrics in rows.values() for k in metrics))
        order = (["accuracy"] + sorted(k for k in keys if k.startswith("accuracy_")) + ["macro_f1"]
                 + [k for k in ("routing_accuracy", "language_routing") if k in keys])
        titles = [COLUMN_TITLES.get(k, k.replace("accuracy_", "accuracy on ") + " %") for k in order]
        spec = (settings or {}).get(setting)
        title = f"### Teachers split {setting}" if spec is None or spec.split == setting else f"### {setting}: {spec.describe()}"
        lines += [title, "", "| method | " + " | ".join(titles) + " | n |", "|---" * (len(order) + 2) + "|"]
        for name, metrics in rows.items():
            lines.append(f"| {name} | " + " | ".join(fmt(metrics.get(k)) for k in order) + f" | {metrics['accuracy']['n']} |")
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
        ax.set_title(split if not split[0].isdigit() else f"teachers {split}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="reduced")
    parser.add_argument("--output_dir", default=None, help="default: outputs/bench/<config>")
    parser.add_argument("--settings", "--splits", nargs="+", default=None,
                        help="settings to run (default: all of the configuration's; for reduced/full: 2x10 4x5)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--methods", nargs="+", default=None, choices=list(STUDENTS),
                        help="student methods (default: each setting's list, else all)")
    parser.add_argument("--no_oracle", action="store_true")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel jobs (default: CPU count // threads on CPU, 1 on a GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker on CPU")
    opts = parser.parse_args(argv)
    cfg = CONFIGS[opts.config]
    available = settings_of(cfg)
    settings = opts.settings or list(available)
    unknown = [s for s in settings if s not in available]
    if unknown:
        parser.error(f"unknown settings {unknown} for --config {opts.config}; choose from {list(available)}")
    out = Path(opts.output_dir or REPO / "outputs" / "bench" / opts.config).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workers = opts.workers or (1 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // opts.threads))
    started = time.perf_counter()
    print(f"config {opts.config}: {cfg}\nsignal cache: {HAS_SIGNAL_CACHE}; workers {workers}; output {out}", flush=True)

    teacher_sets = sorted({(s, teacher_seed_of(cfg, seed, opts.seeds)) for s in settings for seed in opts.seeds})
    students = [("student", dict(setting=s, seed=seed, teacher_seed=teacher_seed_of(cfg, seed, opts.seeds), method=m))
                for s in settings for seed in opts.seeds for m in methods_of(available[s], opts.methods)]
    phases = [
        # 1: teachers and oracles (independent of each other)
        [("teacher", dict(setting=s, teacher_seed=ts, index=i)) for s, ts in teacher_sets for i in range(len(available[s].teachers))]
        + ([] if opts.no_oracle else [("oracle", dict(setting=s, seed=seed)) for s in oracle_settings(available, settings)
                                      for seed in opts.seeds]),
        # 2: teacher signals on the test rows, and one student per teacher set (fills its signal cache)
        [("signals", dict(setting=s, teacher_seed=ts, index=i, language=lang))
         for s, ts in teacher_sets for i in range(len(available[s].teachers)) for lang in available[s].transfer],
        # 3: every other student, setting by setting
        students,
    ]
    if HAS_SIGNAL_CACHE:  # warm each teacher set's cache once before students read it in parallel
        warm = list({(p["setting"], p["teacher_seed"]): (kind, p) for kind, p in students if p["seed"] == p["teacher_seed"]}.values())
        phases[1] = warm + phases[1]
        phases[2] = [job for job in students if job not in warm]

    records, phase_seconds = [], []
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(opts.threads,)) as pool:
        for phase in phases:
            t0 = time.perf_counter()
            running = [pool.submit(run_job, opts.config, str(out), kind, params) for kind, params in phase]
            records += [job.result() for job in running]
            phase_seconds.append(round(time.perf_counter() - t0, 1))

    table = aggregate(cfg, out, records, opts.seeds, settings, opts.methods)
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
        "settings": {k: v for k, v in cfg.items() if k != "settings"},
        "setting_specs": {s: dataclasses.asdict(available[s]) for s in settings},
        "seeds": opts.seeds,
        "num_test": {s: {lang: len(load_data(cfg, lang)[2]) for lang in available[s].transfer} for s in settings},
        "signal_cache": HAS_SIGNAL_CACHE,
        "hardware": hardware,
        "wall_seconds": wall,
        "phase_seconds": phase_seconds,
        "table": table,
        "records": records,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    num_test = len(load_data(cfg)[2])
    model = "" if "settings" in cfg else f"{short(cfg['model'])}, "
    header = (f"## {opts.config} configuration ({model}{cfg['max_length']} tokens, {num_test} test rows per language, "
              f"seeds {opts.seeds}; wall time of this run {wall / 60:.1f} min)")
    (out / "results.md").write_text(markdown(table, header, available) + "\n")
    chart(table, out / "results.png", f"debian_sections20, {opts.config} configuration")
    print(markdown(table, header, available))
    print(f"wrote {out / 'results.json'}, results.md, results.png; wall time {wall} s (phases {phase_seconds})")
    return result


if __name__ == "__main__":
    main()
