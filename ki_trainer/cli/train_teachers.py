"""``ki-trainer train-teachers``: fine-tune one teacher per class subset with the plain ``transformers.Trainer``.

This is the "teachers you would download from the Hub" step of knowledge integration: each teacher
sees only its own classes of the embedded debian_sections20 benchmark, and is saved as an ordinary
Hugging Face model directory whose config.id2label holds ITS OWN label names, so
``pipeline("text-classification", model=dir)`` just works.

Writes ``<output_dir>/teacher_<i>/`` (model + tokenizer) and ``<output_dir>/teachers.json`` (teacher
paths relative to that file, label sets, validation accuracy on each teacher's own classes). A
teacher whose directory already holds the same label set is reused, not retrained (and not
re-evaluated when teachers.json already scored it with the same settings); --overwrite_teachers retrains.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import datasets
import numpy as np
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from ..console import hide_progress_bars, phase, quiet_model_loading
from ..data import cap_per_class, filter_by_labels, label_maps, load_debian_sections, partition_labels
from ..launch import check_launch, output_dir_lock
from ..pretrained import resolve_model
from ..pretrained.resolve import hub_id_of
from .arguments import CommandParser, is_help_all
from .errors import CommandError, check_model_path

DESCRIPTION = """\
Fine-tune one teacher classifier per disjoint subset of the debian_sections20 classes (the experts
that `ki-trainer integrate` later merges). Each teacher is a plain Hugging Face model directory whose
config.id2label holds its own label names; finished teachers are reused on the next run.

  ki-trainer train-teachers --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 --split_spec 2x10 \\
      --max_train_per_class 20 --max_length 64 --num_train_epochs 1 --output_dir runs/teachers
  ki-trainer train-teachers teachers.yaml --num_train_epochs 3   # run file, flags override"""


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


@dataclass
class TeacherTrainingArguments:
    """What to train: base encoder, class subsets, data size."""

    model_name_or_path: str = field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        metadata={"help": "Base encoder (Hub id or local directory) that every teacher starts from."},
    )
    split_spec: str = field(
        default="2x10",
        metadata={"help": "Teacher label subsets: 'NxK', 'random:NxK' or a JSON list of label lists."},
    )
    split_seed: int = field(default=0, metadata={"help": "Seed for 'random:' split specs."})
    max_train_per_class: Optional[int] = field(default=None, metadata={"help": "Cap training rows per class."})
    max_length: int = field(default=128, metadata={"help": "Tokenizer truncation length."})
    language: str = field(default="en", metadata={"help": "Text language ('en' or a DDTP code such as 'de')."})
    data_path: Optional[str] = field(default=None, metadata={"help": "Data file; default: the copy shipped with the package."})
    overwrite_teachers: bool = field(default=False, metadata={"help": "Retrain teachers that already exist."})
    keep_checkpoints: bool = field(
        default=False,
        metadata={"help": "Save the Trainer's checkpoints (optimizer state included: ~3x a teacher's size each) under "
                  "<output_dir>/checkpoints/teacher_<i> as --save_strategy says. Default: only finished teachers "
                  "(and their model cards) are written."},
    )


ScriptArguments = TeacherTrainingArguments  # the name examples/train_teachers.py used


def teacher_splits(
    data: datasets.DatasetDict, labels: Sequence[str], max_train_per_class: Optional[int], seed: int
) -> datasets.DatasetDict:
    """A teacher's view of the data: only its own classes, training rows capped per class."""
    own = filter_by_labels(data, labels)
    return datasets.DatasetDict({"train": cap_per_class(own["train"], max_train_per_class, seed), "val": own["val"]})


def encode(
    splits: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, labels: Sequence[str], max_length: int
) -> datasets.DatasetDict:
    """Tokenize text and turn label names into the teacher's own ids (its position in `labels`)."""
    _, label2id = label_maps(labels)

    def _encode(batch: dict[str, list]) -> dict[str, Any]:
        features = tokenizer(batch["text"], truncation=True, max_length=max_length)
        features["labels"] = [label2id[name] for name in batch["label"]]
        return features

    return splits.map(_encode, batched=True, remove_columns=splits["train"].column_names)


def cached_labels(teacher_dir: Path) -> Optional[list[str]]:
    """Label names of a finished teacher directory in id order, or None if there is no complete model."""
    config = teacher_dir / "config.json"
    if not config.is_file() or not any((teacher_dir / name).is_file() for name in WEIGHT_FILES):
        return None
    id2label = json.loads(config.read_text()).get("id2label") or {}
    return [id2label[key] for key in sorted(id2label, key=int)]


def is_cached(teacher_dir: Path, labels: Sequence[str]) -> bool:
    """True when `teacher_dir` holds a finished teacher for exactly `labels`; raises if it holds another one.

    Raising (instead of silently retraining) protects a teacher trained for a different split spec.
    """
    found = cached_labels(teacher_dir)
    if found is None:
        return False
    if found != list(labels):
        raise ValueError(
            f"{teacher_dir} holds a teacher for {found}, but this run wants {list(labels)}; "
            "pass --overwrite_teachers or choose another --output_dir."
        )
    return True


def compute_accuracy(eval_pred: Any) -> dict[str, float]:
    """Accuracy over the teacher's own classes (numpy only: `evaluate.load` needs the Hub)."""
    logits, label_ids = eval_pred
    return {"accuracy": float(np.mean(np.argmax(logits, axis=-1) == label_ids))}


def previous_records(summary_file: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Teacher records of an earlier run with the same settings, by path: cached teachers skip re-evaluation."""
    if not summary_file.is_file():
        return {}
    old = json.loads(summary_file.read_text())
    if any(old.get(key) != value for key, value in settings.items()):
        return {}
    return {record["path"]: record for record in old.get("teachers", [])}


def train_and_evaluate_teacher(
    model_path: str,
    labels: Sequence[str],
    encoded: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    args: TrainingArguments,
    teacher_dir: Path,
    train: bool,
    keep_checkpoints: bool = False,
    card: Optional[dict[str, Any]] = None,
) -> float:
    """Fine-tune a teacher from `model_path` into `teacher_dir` (if `train`), then return its val accuracy.

    A trained teacher is evaluated before it is saved, so its model card (``README.md``, written by
    transformers' ``TrainingSummary`` with ``card`` as its arguments) carries its validation accuracy.
    Without ``keep_checkpoints`` no Trainer checkpoint is written.
    """
    checkpoints = teacher_dir.parent / "checkpoints" / teacher_dir.name
    overrides: dict[str, Any] = {"output_dir": str(checkpoints)}
    if not keep_checkpoints:
        overrides["save_strategy"] = "no"
        if args.load_best_model_at_end:
            overrides["load_best_model_at_end"] = False  # it needs checkpoints; the last weights are kept
    run_args = dataclasses.replace(args, **overrides)
    id2label, label2id = label_maps(labels)
    set_seed(args.seed)
    with quiet_model_loading():  # a teacher built from an encoder has a new head: expected, no table
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path if train else str(teacher_dir),
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,  # the base may already carry a head of another size
        )
    trainer = Trainer(
        model=model,
        args=run_args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["val"],
        processing_class=tokenizer,
        compute_metrics=compute_accuracy,
    )
    if not train:
        return trainer.evaluate()["eval_accuracy"]
    trainer.train()
    accuracy = trainer.evaluate()["eval_accuracy"]
    partial = teacher_dir.with_name(teacher_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with quiet_model_loading():
        trainer.save_model(str(partial))  # model + tokenizer; renamed once complete: the cache never sees half
    if trainer.is_world_process_zero():
        from transformers.modelcard import TrainingSummary

        summary = TrainingSummary.from_trainer(trainer, model_name=teacher_dir.name, tasks="text-classification",
                                               **(card or {}))
        (partial / "README.md").write_text(summary.to_model_card(), encoding="utf-8")
    shutil.rmtree(teacher_dir, ignore_errors=True)
    partial.rename(teacher_dir)
    if not keep_checkpoints and checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
        if not any(checkpoints.parent.iterdir()):
            checkpoints.parent.rmdir()
    return accuracy


def build_parser(full_help: bool = False, prog: str = "ki-trainer train-teachers") -> CommandParser:
    return CommandParser(
        (TeacherTrainingArguments, TrainingArguments),
        prog=prog,
        description=DESCRIPTION,
        groups=[("what to train", list(TeacherTrainingArguments.__dataclass_fields__))],
        full_help=full_help,
    )


def main(argv: Optional[Sequence[str]] = None, prog: str = "ki-trainer train-teachers") -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, training_args = build_parser(is_help_all(argv), prog).parse(argv)
    return run(script_args, training_args)


def run(script_args: TeacherTrainingArguments, training_args: TrainingArguments) -> dict[str, Any]:
    """Train (or reuse) every teacher of ``script_args.split_spec`` and write teachers.json."""
    check_launch(training_args)
    hide_progress_bars(bool(training_args.disable_tqdm))
    if training_args.dataloader_pin_memory and training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # nothing to pin on CPU (and torch warns about it)
    data = load_debian_sections(script_args.data_path, language=script_args.language)  # the user's file first
    try:
        subsets = partition_labels(data["train"]["label"], script_args.split_spec, seed=script_args.split_seed)
    except ValueError as error:
        sections = len(set(data["train"]["label"]))
        grids = ", ".join(f"{n}x{sections // n}" for n in range(2, sections // 2 + 1) if sections % n == 0)
        raise CommandError(f"--split_spec {script_args.split_spec!r}: {error} Every one of the {sections} labels needs "
                           f"exactly one teacher: use {grids}, 'random:NxK' or a JSON list of label lists.") from None
    model_path = str(resolve_model(script_args.model_name_or_path))
    check_model_path("--model_name_or_path", model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "model_name_or_path": script_args.model_name_or_path,
        "language": script_args.language,
        "max_length": script_args.max_length,
        "max_train_per_class": script_args.max_train_per_class,
    }
    base_hub_id = hub_id_of(model_path) or (script_args.model_name_or_path if not Path(
        script_args.model_name_or_path).exists() else None)
    data_name = "debian_sections20" if script_args.data_path is None else Path(script_args.data_path).name
    card = {"finetuned_from": base_hub_id, "dataset": data_name, "dataset_tags": data_name,
            "tags": ["ki-trainer", "ki-trainer-teacher"]}  # dataset_tags: transformers' model-index needs them
    main_process = training_args.process_index == 0
    with output_dir_lock(str(output_dir), is_main_process=main_process):
        previous = previous_records(output_dir / "teachers.json", settings)
        teachers = []
        for i, labels in enumerate(subsets):
            teacher_dir = output_dir / f"teacher_{i}"
            cached = not script_args.overwrite_teachers and is_cached(teacher_dir, labels)
            record = previous.get(teacher_dir.name)
            status = "cached" if cached else "trained"
            if not (cached and record is not None and record["labels"] == list(labels)):
                verb = "evaluating cached" if cached else "training"
                with phase(f"{verb} teacher {i + 1}/{len(subsets)} ({len(labels)} classes)", enabled=main_process):
                    splits = teacher_splits(data, labels, script_args.max_train_per_class, training_args.seed)
                    encoded = encode(splits, tokenizer, labels, script_args.max_length)
                    accuracy = train_and_evaluate_teacher(
                        model_path, labels, encoded, tokenizer, training_args, teacher_dir, train=not cached,
                        keep_checkpoints=script_args.keep_checkpoints, card=card,
                    )
                record = {
                    "path": teacher_dir.name,
                    "labels": list(labels),
                    "val_accuracy": accuracy,
                    "num_train": len(encoded["train"]),
                    "num_val": len(encoded["val"]),
                }
            if main_process:
                print(f"{teacher_dir.name} ({status}): {labels} val accuracy {record['val_accuracy']:.4f}")
            teachers.append(record)

        summary = {**settings, "split_spec": script_args.split_spec, "teachers": teachers}
        if main_process:
            (output_dir / "teachers.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
