"""Merge fine-tuned teachers into one student over the union of their labels, WITHOUT labels.

The drop-in Trainer script: every ``TrainingArguments`` option and every knowledge-integration
option of :class:`ki_trainer.KnowledgeIntegrationConfig` is a command-line flag.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python examples/integrate.py \
        --teachers outputs/teachers/teachers.json \
        --student sentence-transformers/paraphrase-MiniLM-L3-v2 \
        --strategy muki --selection soft --mc_samples 16 --teacher_signals cached --max_length 64 \
        --num_train_epochs 2 --per_device_train_batch_size 16 --learning_rate 1e-4 \
        --eval_strategy epoch --save_strategy no --report_to none --output_dir outputs/student

It runs unchanged under ``accelerate launch examples/integrate.py ...`` (DDP, mixed precision). On a
CPU-only machine, several processes need ``accelerate launch --multi_gpu --num_processes 2 ... --use_cpu true``:
without ``--use_cpu`` every process trains on its own (transformers does not enter DDP on CPU).

--teachers takes model directories / Hub ids (each with its label names in config.id2label), or the
teachers.json written by examples/train_teachers.py. --dataset defaults to the embedded
debian_sections20 benchmark; any ``datasets.load_dataset`` name or local path with train /
validation / test splits works too. The TRAIN split is used without its labels (the label column
is dropped before the trainer sees it); validation and test labels serve evaluation only.
Final test metrics are printed and written to ``<output_dir>/test_metrics.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
from transformers import HfArgumentParser, set_seed

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher
from ki_trainer.data import load_debian_sections
from ki_trainer.pretrained import resolve_model

EMBEDDED_DATASET = "debian_sections20"


@dataclass
class ScriptArguments:
    teachers: list[str] = field(
        metadata={"help": "Teacher model directories / Hub ids, or a teachers.json from examples/train_teachers.py."}
    )
    student: str = field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        metadata={"help": "Student backbone (Hub id or directory); it gets a fresh head over the union labels."},
    )
    dataset: str = field(
        default=EMBEDDED_DATASET,
        metadata={"help": f"'{EMBEDDED_DATASET}' (embedded) or a datasets.load_dataset name / local path."},
    )
    language: str = field(default="en", metadata={"help": f"Text language of {EMBEDDED_DATASET} ('en', 'de', ...)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Random subset of the train split."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Random subset of validation and test."})


def teacher_paths(specs: list[str]) -> list[str]:
    """Expand a teachers.json (paths relative to the file) into teacher paths; resolve Hub ids."""
    paths = []
    for spec in specs:
        if spec.endswith(".json"):
            summary = json.loads(Path(spec).read_text())
            paths += [str(Path(spec).parent / record["path"]) for record in summary["teachers"]]
        else:
            paths.append(str(resolve_model(spec)))
    return paths


def load_splits(script_args: ScriptArguments) -> datasets.DatasetDict:
    if script_args.dataset == EMBEDDED_DATASET:
        return load_debian_sections(language=script_args.language)
    data = datasets.load_dataset(script_args.dataset)
    if "val" not in data:
        data["val"] = data.pop("validation")
    return data


def subset(dataset: datasets.Dataset, size: Optional[int], seed: int) -> datasets.Dataset:
    return dataset if size is None or size >= len(dataset) else dataset.shuffle(seed=seed).select(range(size))


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = HfArgumentParser((ScriptArguments, KnowledgeIntegrationConfig))
    script_args, args = parser.parse_args_into_dataclasses(args=argv)

    data = load_splits(script_args)
    train = subset(data["train"], script_args.max_train_samples, args.seed)
    if args.label_column in train.column_names:
        train = train.remove_columns(args.label_column)  # knowledge integration is label-free
    val = subset(data["val"], script_args.max_eval_samples, args.seed)
    test = subset(data["test"], script_args.max_eval_samples, args.seed)

    # Each teacher reads the text with its own tokenizer (shared automatically where they are equal).
    teachers = [Teacher(path, tokenizer=path) for path in teacher_paths(script_args.teachers)]
    set_seed(args.seed)  # the trainer initialises the student's new classification head below
    trainer = KnowledgeIntegrationTrainer(
        model=str(resolve_model(script_args.student)),  # the tokenizer is loaded from the same place
        args=args,
        teachers=teachers,
        train_dataset=train,
        eval_dataset=val,
    )
    trainer.train()
    trainer.save_model()

    metrics = {} if args.eval_strategy != "no" else trainer.evaluate(val, metric_key_prefix="eval")
    metrics.update(trainer.evaluate(test, metric_key_prefix="test"))
    trainer.log_metrics("test", metrics)
    if trainer.is_world_process_zero():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "test_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()
