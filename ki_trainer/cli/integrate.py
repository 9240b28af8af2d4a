"""``ki-trainer integrate``: merge fine-tuned teachers into one student over the union of their labels.

The student learns WITHOUT labels: the train split's label column is dropped before the trainer sees
it; validation and test labels serve evaluation only. Final test metrics are printed and written to
``<output_dir>/test_metrics.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..config import KnowledgeIntegrationConfig
from ..console import hide_progress_bars, phase, quiet_model_loading, use_row_progress
from ..launch import check_launch
from .arguments import CommandParser, is_help_all, own_fields, teacher_mapping, teacher_spec_list
from ..errors import non_utf8_error
from .errors import CommandError, check_model_path

EMBEDDED_DATASET = "debian_sections20"
TEACHER_KEYS = {"path", "tokenizer", "labels", "name", "max_length"}

DESCRIPTION = """\
Merge fine-tuned classifiers (teachers), each an expert on its own labels, into ONE student over the
union of their labels, without human labels: the student learns from the teachers' predictions on
the unlabeled train split (MUKI by default: Monte-Carlo-dropout certainty picks the competent teacher).

  ki-trainer integrate run.yaml                       # everything from a run file
  ki-trainer integrate run.yaml --learning_rate 5e-5  # flags override the file
  ki-trainer integrate --teachers outputs/teachers/teachers.json --strategy muki --output_dir out
  accelerate launch -m ki_trainer integrate run.yaml  # several GPUs (see docs: multi-GPU guide)

A run file (YAML or JSON) holds any option below; teachers may be paths / Hub ids, a teachers.json
from `ki-trainer train-teachers`, or mappings {path, tokenizer, labels, name, max_length}
(tokenizer: a path, or "student" to read the student's tokenization; default: the teacher's own).
Relative paths are relative to the current directory."""


@dataclass
class IntegrateArguments:
    """What to integrate: teachers, student and data."""

    teachers: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Teacher model directories / Hub ids, or a teachers.json from `ki-trainer train-teachers`."},
    )
    student: str = field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        metadata={"help": "Student backbone (Hub id or directory); it gets a fresh head over the union labels.",
                  "aliases": ["--model_name_or_path"]},
    )
    dataset: Optional[str] = field(
        default=None,
        metadata={"aliases": ["--dataset_name"], "help": "A datasets.load_dataset name or local folder with train / validation / test splits "
                  f"(gold labels: evaluation only), or '{EMBEDDED_DATASET}' (embedded). Default: "
                  f"'{EMBEDDED_DATASET}', allowed only for teachers trained on its sections (ki-trainer train-teachers)."},
    )
    language: str = field(default="en", metadata={"help": f"Text language of {EMBEDDED_DATASET} ('en', 'de', ...)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Random subset of the train split."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Random subset of validation and test."})
    routing_report: bool = field(
        default=True,
        metadata={"help": "After testing, write routing_report.json and .png (matplotlib) to output_dir: per label, "
                  "which teacher the router chose and how often, the routing margins, student vs routed-ensemble "
                  "accuracy; the model card shows the PNG. One more pass of student and teachers over the test split."},
    )
    # LoRA student, named as TRL's ModelConfig names it
    use_peft: bool = field(default=False, metadata={"help": "Train the student as a LoRA adapter (peft); the classifier "
                                                    "head is trained fully. Saved as an adapter unless --merge_adapter."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with --use_peft)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (with --use_peft)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (with --use_peft)."})
    lora_target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Module names LoRA adapts (with --use_peft), or 'all-linear'; default: peft's "
                                "choice for the architecture (BERT: query, value)."})
    lora_modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained fully besides the adapters (the classifier head always is)."})


TeacherSpec = Union[str, dict]


def teacher_specs(specs: Sequence[TeacherSpec]) -> list[dict[str, Any]]:
    """Normalise teacher entries into ``{path, tokenizer, ...}`` dicts; expand teachers.json files.

    A teachers.json lists paths relative to the file. Hub ids are resolved to offline copies where the
    package provides one (``ki_trainer.pretrained``).
    """
    from ..pretrained import resolve_model

    specs = teacher_spec_list(specs)  # `teachers: path` in a run file: one teacher, not a list of characters
    out: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, dict):
            entry = teacher_mapping(i, spec, TEACHER_KEYS)
        elif isinstance(spec, str) and spec.endswith(".json"):
            if not Path(spec).is_file():
                raise CommandError(f"Teacher {i}: teachers file not found: {spec}")
            out += [{"path": path} for path in _teachers_file(spec)]
            continue
        elif isinstance(spec, str):
            entry = {"path": spec}
        else:
            raise TypeError(f"Teacher {i}: expected a path, a Hub id or a mapping, got {type(spec).__name__}.")
        entry["path"] = str(resolve_model(str(entry["path"])))
        check_model_path(f"Teacher {i}", entry["path"])
        out.append(entry)
    return out


def _teachers_file(path: str) -> list[str]:
    """The teacher directories a ``teachers.json`` of ``ki-trainer train-teachers`` lists (relative to the file)."""
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CommandError(f"{path}: a teachers file must be the JSON that `ki-trainer train-teachers` writes; it does "
                           f"not parse ({error}).") from None
    records = summary.get("teachers") if isinstance(summary, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("path"), str) for r in records):
        raise CommandError(
            f"{path} is not a teachers file: it needs a 'teachers' list of {{\"path\": ...}} records (what `ki-trainer "
            "train-teachers` writes). To use a model directory as a teacher, give the directory itself."
        )
    return [str(Path(path).parent / record["path"]) for record in records]


def build_teachers(specs: Sequence[TeacherSpec]) -> list:
    """:class:`~ki_trainer.Teacher` objects from run-file / command-line teacher entries.

    Each teacher reads the text with its own tokenizer unless its entry says ``tokenizer: student``
    (tokenizers that are equal are shared automatically by the collator).
    """
    from ..teacher import Teacher

    teachers = []
    for entry in teacher_specs(specs):
        tokenizer = entry.get("tokenizer", entry["path"])
        tokenizer = None if tokenizer == "student" else str(tokenizer)
        with quiet_model_loading():
            teachers.append(Teacher(entry["path"], tokenizer=tokenizer, labels=entry.get("labels"),
                                    name=entry.get("name"), max_length=entry.get("max_length")))
    return teachers


def load_splits(dataset: str, language: str = "en"):
    """The embedded benchmark, or a ``datasets.load_dataset`` name / path with a validation split as ``val``."""
    import datasets

    from ..data import load_debian_sections

    if dataset in (None, EMBEDDED_DATASET):
        return load_debian_sections(language=language)
    if dataset.startswith((".", "/", "~")) and not Path(dataset).expanduser().exists():
        raise CommandError(f"--dataset: no such file or folder {dataset!r} (relative to {Path.cwd()}).")
    local = Path(dataset).expanduser()
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local] if local.is_file() else []
    for file in files:  # pyarrow reads a latin-1 byte without complaint and fails later without file or row
        if file.suffix in (".json", ".jsonl", ".csv", ".tsv", ".txt", ".gz", ".xz", ".bz2"):
            bad = non_utf8_error(file)
            if bad is not None:
                raise bad
    data = datasets.load_dataset(dataset)
    if "val" not in data and "validation" in data:
        data["val"] = data.pop("validation")
    missing = [split for split in ("train", "val", "test") if split not in data]
    if missing:
        raise CommandError(f"Dataset {dataset!r} has splits {list(data)}; integrate needs train, validation and test "
                           f"(missing: {missing}): e.g. a folder with train.json, validation.json and test.json.")
    return data


def gold_label_names(split, column: str) -> set[str]:
    """The label names a split's gold column holds (names, or ``ClassLabel`` ids; plain integer ids: none)."""
    if column not in split.column_names:
        return set()
    feature = split.features[column]
    values = split[column]
    if hasattr(feature, "names"):
        return {feature.names[v] for v in values if isinstance(v, int) and 0 <= v < len(feature.names)}
    return {v for v in values if isinstance(v, str)}


def check_labels_owned(data, teachers: Sequence, dataset: Optional[str], label_column: str) -> None:
    """Every gold label of the validation and test splits must be one some teacher predicts, else the run
    would train and save a student only to fail at evaluation; the error comes before training."""
    union = {label for teacher in teachers for label in teacher.labels}
    for split in ("val", "test"):
        unknown = sorted(gold_label_names(data[split], label_column) - union)
        if not unknown:
            continue
        shown = ", ".join(map(repr, unknown[:8])) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        if dataset is None:
            raise CommandError(
                f"No --dataset given, so integrate would read the embedded {EMBEDDED_DATASET}, whose labels "
                f"{shown} no teacher predicts (the teachers' labels: {sorted(union)}). Pass --dataset NAME_OR_FOLDER "
                "with train / validation / test splits of the text your teachers were trained for (gold labels are "
                "used for evaluation only)."
            )
        split_name = "validation" if split == "val" else split
        raise CommandError(
            f"Dataset {dataset!r}: the {split_name} split's gold labels {shown} (column {label_column!r}) are not "
            f"among the teachers' labels {sorted(union)}. The student can only predict the union of its teachers' "
            "labels: add a teacher for them or drop those rows."
        )


def subset(dataset, size: Optional[int], seed: int):
    return dataset if size is None or size >= len(dataset) else dataset.shuffle(seed=seed).select(range(size))


def build_parser(full_help: bool = False, prog: str = "ki-trainer integrate") -> CommandParser:
    return CommandParser(
        (IntegrateArguments, KnowledgeIntegrationConfig),
        prog=prog,
        description=DESCRIPTION,
        groups=[
            ("what to integrate", [f for f in IntegrateArguments.__dataclass_fields__]),
            ("knowledge integration options (KnowledgeIntegrationConfig)", own_fields(KnowledgeIntegrationConfig)),
        ],
        full_help=full_help,
    )


def lora_config(script_args: IntegrateArguments):
    """The ``peft.LoraConfig`` of ``--use_peft`` (``None`` without it), as TRL's ``get_peft_config`` builds it."""
    if not script_args.use_peft:
        for name in ("lora_target_modules", "lora_modules_to_save"):
            if getattr(script_args, name):
                raise CommandError(f"--{name} is given but --use_peft is not: add --use_peft true to train a LoRA student.")
        return None
    try:
        from peft import LoraConfig, TaskType
    except ImportError:
        raise CommandError("--use_peft needs the peft package: pip install peft") from None
    targets = script_args.lora_target_modules
    if targets is not None and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=script_args.lora_r, lora_alpha=script_args.lora_alpha,
                      lora_dropout=script_args.lora_dropout, target_modules=targets,
                      modules_to_save=script_args.lora_modules_to_save)


def run(script_args: IntegrateArguments, args: KnowledgeIntegrationConfig) -> dict[str, float]:
    """The integrate job for parsed arguments: load data and teachers, train, save, evaluate on test."""
    from transformers import set_seed

    from ..pretrained import resolve_model
    from ..trainer import KnowledgeIntegrationTrainer

    if not script_args.teachers:
        raise CommandError("No teachers: pass --teachers PATH [PATH ...] or list `teachers:` in the run file.")
    specs = teacher_specs(script_args.teachers)  # every path checked before any data or model is loaded
    student = str(resolve_model(script_args.student))  # after the user's own inputs: their mistakes are named first
    check_model_path("--student", student)
    peft_config = lora_config(script_args)
    check_launch(args)  # before any work: a broken multi-process launch fails in seconds
    hide_progress_bars(bool(args.disable_tqdm))
    main = args.process_index == 0
    with phase("loading data", enabled=main):
        data = load_splits(script_args.dataset, script_args.language)
        train = subset(data["train"], script_args.max_train_samples, args.seed)
        if args.label_column in train.column_names:
            train = train.remove_columns(args.label_column)  # knowledge integration is label-free
        val = subset(data["val"], script_args.max_eval_samples, args.seed)
        test = subset(data["test"], script_args.max_eval_samples, args.seed)
    with phase("loading teachers", enabled=main):
        teachers = build_teachers(specs)
    check_labels_owned(data, teachers, script_args.dataset, args.label_column)
    set_seed(args.seed)  # the trainer initialises the student's new classification head below
    trainer = KnowledgeIntegrationTrainer(
        model=student,  # the tokenizer is loaded from the same place
        args=args,
        teachers=teachers,
        train_dataset=train,
        eval_dataset=val,
        peft_config=peft_config,
    )
    dataset_name = script_args.dataset or EMBEDDED_DATASET
    if Path(dataset_name).expanduser().exists():  # a local folder or file: the card names it, never its path
        dataset_name = Path(dataset_name).expanduser().resolve().name
    trainer.model_card_kwargs = {"dataset": dataset_name}
    use_row_progress(trainer)
    with phase(f"training the student on {len(train)} unlabeled rows", enabled=main):
        train_result = trainer.train()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    # Evaluate BEFORE saving: the model card (and a push_to_hub) then carries the final metrics.
    with phase("evaluating", enabled=main):
        eval_metrics = trainer.evaluate(val, metric_key_prefix="eval")
        test_metrics = trainer.evaluate(test, metric_key_prefix="test")
    for split, values in (("eval", eval_metrics), ("test", test_metrics)):
        trainer.log_metrics(split, values)
        trainer.save_metrics(split, values)  # eval_results.json, test_results.json, all_results.json
    if script_args.routing_report and args.world_size == 1:  # (several processes: each would see its shard only)
        from ..report import write_routing_report

        with phase("routing report", enabled=main):
            write_routing_report(trainer, test, args.output_dir)
    with phase("saving the student and its model card", enabled=main):
        with quiet_model_loading():
            trainer.save_model()
    trainer.save_state()  # trainer_state.json: steps, world size, log history
    metrics = {**eval_metrics, **test_metrics}
    if trainer.is_world_process_zero():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "test_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: Optional[Sequence[str]] = None, prog: str = "ki-trainer integrate") -> dict[str, float]:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, args = build_parser(is_help_all(argv), prog).parse(argv)
    return run(script_args, args)
