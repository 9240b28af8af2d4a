"""Fine-tune one teacher classifier per disjoint class subset with the plain `transformers.Trainer`.

This is the "teachers you would download from the Hub" step of knowledge integration: each teacher
sees only its own classes, and is saved as an ordinary Hugging Face model directory whose
config.id2label holds ITS OWN label names, so `pipeline("text-classification", model=dir)` just works.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python examples/train_teachers.py \
        --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 --split_spec 2x10 \
        --max_train_per_class 20 --max_length 64 --num_train_epochs 1 --per_device_train_batch_size 8 \
        --learning_rate 1e-4 --save_strategy no --output_dir runs/teachers

Writes `<output_dir>/teacher_<i>/` (model + tokenizer) and `<output_dir>/teachers.json` (teacher
paths relative to that file, label sets, validation accuracy on each teacher's own classes).
A teacher whose directory already holds the same label set is reused, not retrained (and not
re-evaluated when teachers.json already scored it with the same settings); --overwrite_teachers retrains.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import datasets
import numpy as np
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from ki_trainer.data import cap_per_class, filter_by_labels, label_maps, load_debian_sections, partition_labels

try:  # Hub ids -> local offline copies, when the package provides them.
    from ki_trainer.pretrained import resolve_model
except ImportError:  # pragma: no cover - older checkouts: use the name as given.

    def resolve_model(name_or_path: str) -> str:
        return name_or_path


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


@dataclass
class ScriptArguments:
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
    data_path: Optional[str] = field(default=None, metadata={"help": "Data file; default: the repo's data/ copy."})
    overwrite_teachers: bool = field(default=False, metadata={"help": "Retrain teachers that already exist."})


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
) -> float:
    """Fine-tune a teacher from `model_path` into `teacher_dir` (if `train`), then return its val accuracy."""
    run_args = dataclasses.replace(args, output_dir=str(teacher_dir.parent / "checkpoints" / teacher_dir.name))
    id2label, label2id = label_maps(labels)
    set_seed(args.seed)
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
    if train:
        trainer.train()
        partial = teacher_dir.with_name(teacher_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        trainer.save_model(str(partial))  # model + tokenizer; renamed once complete: the cache never sees half
        shutil.rmtree(teacher_dir, ignore_errors=True)
        partial.rename(teacher_dir)
    return trainer.evaluate()["eval_accuracy"]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    script_args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses(
        args=argv
    )
    model_path = str(resolve_model(script_args.model_name_or_path))
    data = load_debian_sections(script_args.data_path, language=script_args.language)
    subsets = partition_labels(data["train"]["label"], script_args.split_spec, seed=script_args.split_seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "model_name_or_path": script_args.model_name_or_path,
        "language": script_args.language,
        "max_length": script_args.max_length,
        "max_train_per_class": script_args.max_train_per_class,
    }
    previous = previous_records(output_dir / "teachers.json", settings)

    teachers = []
    for i, labels in enumerate(subsets):
        teacher_dir = output_dir / f"teacher_{i}"
        cached = not script_args.overwrite_teachers and is_cached(teacher_dir, labels)
        record = previous.get(teacher_dir.name)
        if not (cached and record is not None and record["labels"] == list(labels)):
            splits = teacher_splits(data, labels, script_args.max_train_per_class, training_args.seed)
            encoded = encode(splits, tokenizer, labels, script_args.max_length)
            accuracy = train_and_evaluate_teacher(
                model_path, labels, encoded, tokenizer, training_args, teacher_dir, train=not cached
            )
            record = {
                "path": teacher_dir.name,
                "labels": list(labels),
                "val_accuracy": accuracy,
                "num_train": len(encoded["train"]),
                "num_val": len(encoded["val"]),
            }
        status = "cached" if cached else "trained"
        print(f"{teacher_dir.name} ({status}): {labels} val accuracy {record['val_accuracy']:.4f}")
        teachers.append(record)

    summary = {**settings, "split_spec": script_args.split_spec, "teachers": teachers}
    (output_dir / "teachers.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
