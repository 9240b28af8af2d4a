"""merge masked-LM teachers (own vocabularies, own languages) into one multilingual student LM

``ki-trainer merge-distill``: MergeDistill from the command line or a run file. Teachers are masked
LMs, each assigned to languages; the training text is unlabeled rows with a language field (JSON
Lines / JSON / CSV, optionally .gz/.xz/.bz2), or ``debian_ddtp`` JSON Lines as in ``shared/data``.
The student vocabulary is the union of the teachers' vocabularies (tokens seen in the text) or a
given tokenizer; the student is a fresh ``BertForMaskedLM`` saved with its tokenizer to
``output_dir`` (``AutoModelForMaskedLM`` / ``AutoTokenizer`` / ``pipeline("fill-mask")`` load it),
with a model card and ``merge_distill.json`` (teachers, languages, rows, vocabulary coverage, metrics).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .arguments import CommandParser, is_help_all, own_fields, teacher_mapping, teacher_spec_list
from ..console import hide_progress_bars, phase, quiet_model_loading, use_row_progress
from ..launch import check_launch
from ..merge_distill.config import MergeDistillConfig
from ..merge_distill.texts import DATA_FORMATS, DDTP_SOURCES, ddtp_split_of, load_texts, read_rows  # noqa: F401

TEACHER_KEYS = {"path", "languages", "name", "tokenizer", "max_length"}

DESCRIPTION = """\
Merge pre-trained masked LMs, each with its own vocabulary and its own languages, into ONE smaller
multilingual student masked LM by task-agnostic distillation (MergeDistill): each text is tokenized
and masked by its language's teacher, mapped to the student vocabulary, and the student learns
alpha * KD(teacher top-k) + (1 - alpha) * MLM at the masked positions. No labels are used.

  ki-trainer merge-distill run.yaml                      # everything from a run file
  ki-trainer merge-distill run.yaml --num_train_epochs 2 # flags override the file
  ki-trainer merge-distill --teachers runs/en-mlm=en runs/multi-mlm=it,de \\
      --train_files /work/shared/data/debian_ddtp.jsonl.xz --max_rows_per_language 300 --output_dir student

Teachers: PATH=LANG[,LANG...] on the command line; in a run file also mappings
{path, languages, name, tokenizer, max_length}. A single teacher may omit its languages (it then
reads every text). Text files: rows with a text and a language field (--text_column,
--language_column; an id field is used when present), or debian_ddtp rows {package, source, lang,
text}. Relative paths are relative to the current directory."""


@dataclass
class MergeDistillArguments:
    """What to merge: teachers, text and the student's vocabulary and size."""

    teachers: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Teacher masked LMs (directories / Hub ids) with their languages: PATH=en or PATH=it,de."},
    )
    train_files: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Training text: .jsonl/.json/.csv/.tsv files (optionally .gz/.xz/.bz2) with a text and a "
                  "language field, or debian_ddtp JSON Lines."},
    )
    eval_files: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Optional held-out text in the same formats; reports eval_loss and eval_masked_accuracy."},
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "'rows' (text + language fields), 'debian_ddtp' ({package, source, lang, text}: only the "
                  "teachers' languages are read) or 'auto' (per file, from its first row).",
                  "choices": list(DATA_FORMATS)},
    )
    ddtp_sources: str = field(
        default="by_split",
        metadata={"help": "debian_ddtp files: 'by_split' trains only on source packages that debian_sections20 puts "
                  "in train and evaluates only on its validation sources (its test texts are never read); "
                  "'all' reads every row.", "choices": list(DDTP_SOURCES)},
    )
    max_rows_per_language: Optional[int] = field(
        default=None,
        metadata={"help": "Keep the first N texts of each language (per split, in file order)."},
    )
    student_tokenizer: Optional[str] = field(
        default="auto",
        metadata={"help": "The student's own tokenizer: it reads every language in training and is saved with the "
                  "student. 'auto' (default): the teacher tokenizer that reads the training text of all languages "
                  "best (fewest [UNK] words, keeps case, fewest pieces per word); 'union': a WordPiece tokenizer over "
                  "the union of the teachers' vocabularies; or a tokenizer directory / Hub id."},
    )
    student_init: str = field(
        default="teacher",
        metadata={"help": "'teacher' (default): start from a copy of a teacher's masked LM (--init_teacher, "
                  "--layer_stride); 'fresh': a new encoder of the --student_* size.", "choices": ["teacher", "fresh"]},
    )
    init_teacher: Optional[str] = field(
        default=None,
        metadata={"help": "With --student_init teacher: the teacher (name) to start from; default: the teacher whose "
                  "tokenizer is the student's, else the first."},
    )
    layer_stride: int = field(
        default=1,
        metadata={"help": "With --student_init teacher: keep every k-th layer, counted from the top (1: all layers)."},
    )
    vocabulary_min_count: int = field(
        default=1,
        metadata={"help": "Union vocabulary: keep a teacher's token only if it occurs this often in the training text "
                  "of its languages (0 keeps every token of every teacher)."},
    )
    min_coverage: float = field(
        default=0.5,
        metadata={"help": "With --student_tokenizer: the least share of each teacher's token occurrences that must "
                  "map to the student tokenizer (else an error with the coverage report)."},
    )
    student_hidden_size: Optional[int] = field(
        default=None,
        metadata={"help": "Student width (default: the teachers' embedding width when they agree; needed to "
                  "initialise the student's embeddings from theirs)."},
    )
    student_num_hidden_layers: int = field(default=4, metadata={"help": "Student transformer layers."})
    student_num_attention_heads: Optional[int] = field(
        default=None, metadata={"help": "Student attention heads (default: hidden size / 64, at least 1)."}
    )
    student_intermediate_size: Optional[int] = field(
        default=None, metadata={"help": "Student feed-forward width (default: 4 x hidden size)."}
    )
    student_max_position_embeddings: int = field(default=512, metadata={"help": "Student position limit."})
    init_embeddings: bool = field(
        default=True,
        metadata={"help": "Initialise each student token's embedding as the mean of the teacher embeddings that "
                  "map to it (--no_init_embeddings: random)."},
    )

    def __post_init__(self) -> None:
        # A run file may give one value where a list is expected (`train_files: texts.jsonl`).
        for name in ("teachers", "train_files", "eval_files"):
            value = getattr(self, name)
            if isinstance(value, (str, dict)):
                setattr(self, name, [value])
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {list(DATA_FORMATS)}, got {self.data_format!r}.")
        if self.ddtp_sources not in DDTP_SOURCES:
            raise ValueError(f"ddtp_sources must be one of {list(DDTP_SOURCES)}, got {self.ddtp_sources!r}.")
        if self.max_rows_per_language is not None and self.max_rows_per_language < 1:
            raise ValueError(f"max_rows_per_language must be >= 1, got {self.max_rows_per_language}.")
        if self.student_init not in ("teacher", "fresh"):
            raise ValueError(f"student_init must be 'teacher' or 'fresh', got {self.student_init!r}.")
        if self.layer_stride < 1:
            raise ValueError(f"layer_stride must be >= 1, got {self.layer_stride}.")
        if self.vocabulary_min_count < 0:
            raise ValueError(f"vocabulary_min_count must be >= 0, got {self.vocabulary_min_count}.")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be in [0, 1], got {self.min_coverage}.")
        for name in ("student_hidden_size", "student_num_hidden_layers", "student_num_attention_heads",
                     "student_intermediate_size", "student_max_position_embeddings"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")


# ---------------------------------------------------------------------- teachers
TeacherSpec = Union[str, dict]


def teacher_entries(specs: Optional[Sequence[TeacherSpec]]) -> list[dict[str, Any]]:
    """Normalise teacher entries (``"PATH=en,de"`` strings or mappings) into ``{path, languages, name, ...}``.

    Raises ValueError naming the entry: no teachers, unknown keys, several teachers of which one has no
    language, a language given to two teachers, or two teachers with the same name.
    """
    from ..pretrained import resolve_model

    specs = teacher_spec_list(specs)  # `teachers: path=en` in a run file: one teacher, not a list of characters
    if not specs:
        raise ValueError("No teachers: pass --teachers PATH=LANG[,LANG] ... or list `teachers:` in the run file.")
    entries: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, dict):
            entry = teacher_mapping(i, spec, TEACHER_KEYS)
        elif isinstance(spec, str):
            path, sep, languages = spec.rpartition("=")
            entry = {"path": path, "languages": languages} if sep else {"path": spec}
        else:
            raise TypeError(f"Teacher {i}: expected 'PATH=LANG[,LANG]' or a mapping, got {type(spec).__name__}.")
        languages = entry.get("languages") or []
        if isinstance(languages, str):
            languages = languages.split(",")
        entry["languages"] = [str(lang).strip() for lang in languages if str(lang).strip()]
        entry["path"] = str(resolve_model(str(entry["path"])))
        entry["name"] = str(entry.get("name") or os.path.basename(os.path.normpath(entry["path"])))
        entries.append(entry)
    names = [e["name"] for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Two teachers are named {duplicates}; give each a distinct `name:` in the run file.")
    if len(entries) > 1:
        for i, entry in enumerate(entries):
            if not entry["languages"]:
                raise ValueError(
                    f"Teacher {i} ({entry['name']}) has no languages; with several teachers each needs its languages "
                    "(PATH=en,de on the command line, `languages: [en, de]` in the run file)."
                )
    owner: dict[str, str] = {}
    for entry in entries:
        for language in entry["languages"]:
            if language in owner:
                raise ValueError(
                    f"Language {language!r} is given to two teachers ({owner[language]!r} and {entry['name']!r}); "
                    "give each language one teacher."
                )
            owner[language] = entry["name"]
    return entries


def build_teachers(entries: Sequence[dict[str, Any]]) -> list:
    """:class:`~ki_trainer.merge_distill.MaskedLMTeacher` objects from :func:`teacher_entries`."""
    from ..merge_distill.teacher import MaskedLMTeacher

    teachers = []
    for entry in entries:
        tokenizer = entry.get("tokenizer")
        with quiet_model_loading():
            teachers.append(MaskedLMTeacher(entry["path"], tokenizer=None if tokenizer is None else str(tokenizer),
                                            languages=entry["languages"], name=entry["name"],
                                            max_length=entry.get("max_length")))
    return teachers


# ---------------------------------------------------------------------- text: ki_trainer/merge_distill/texts.py

# ---------------------------------------------------------------------- vocabulary and student
def build_vocabulary(teachers: Sequence, train, script_args: MergeDistillArguments, args: MergeDistillConfig):
    """The student vocabulary: a given tokenizer (``student_tokenizer``) or the union of the teachers'
    vocabularies, restricted to tokens seen ``vocabulary_min_count`` times in the text of their languages."""
    from transformers import AutoTokenizer

    from ..pretrained import resolve_model
    from ..merge_distill.vocabulary import StudentVocabulary, count_tokens

    texts = train[args.text_column]
    languages = train[args.language_column] if args.language_column in train.column_names else [""] * len(texts)
    counts = []
    for teacher in teachers:
        own = [t for t, lang in zip(texts, languages) if not teacher.languages or lang in teacher.languages]
        counts.append(count_tokens(teacher.tokenizer, own, args.max_length))
    tokenizers, names = [t.tokenizer for t in teachers], [t.name for t in teachers]
    choice = script_args.student_tokenizer or "union"
    if choice == "auto":
        from ..merge_distill.vocabulary import choose_student_tokenizer

        by_language: dict[str, list[str]] = {}
        for text, language in zip(texts, languages):
            bucket = by_language.setdefault(language, [])
            if len(bucket) < 200:
                bucket.append(text)
        best, table = choose_student_tokenizer(tokenizers, by_language, names)
        worst = max(row["unknown_word_share"] for row in table if row["chosen"])
        if worst <= 0.005:  # a teacher tokenizer reads every language: the student uses it as is
            return StudentVocabulary.from_tokenizer(tokenizers[best], tokenizers, names, counts, min_coverage=0.0)
        # no teacher tokenizer reads every language without [UNK] words: the union of their vocabularies does
    if choice in ("auto", "union"):
        if script_args.vocabulary_min_count == 0:
            return StudentVocabulary.union(tokenizers, names)
        return StudentVocabulary.union(tokenizers, names, counts, min_count=script_args.vocabulary_min_count)
    student_tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(choice)))
    return StudentVocabulary.from_tokenizer(student_tokenizer, tokenizers, names, counts,
                                            min_coverage=script_args.min_coverage)


def build_student_for(vocabulary, teachers: Sequence, script_args: MergeDistillArguments):
    """The student ``BertForMaskedLM`` of the size ``script_args`` asks for (width: the teachers' by default)."""
    from ..merge_distill.student import build_student

    if script_args.student_init == "teacher":
        init_teacher = script_args.init_teacher
        if init_teacher is None:
            owner = [t.name for t in teachers if t.tokenizer is vocabulary.tokenizer]
            init_teacher = owner[0] if owner else teachers[0].name
        return build_student(vocabulary, teachers, init="teacher", init_teacher=init_teacher,
                             layer_stride=script_args.layer_stride)
    widths = {t.name: int(t.model.get_input_embeddings().weight.shape[1]) for t in teachers}
    hidden = script_args.student_hidden_size
    if hidden is None:
        if len(set(widths.values())) != 1:
            raise ValueError(f"The teachers embed tokens in different widths {widths}: set --student_hidden_size "
                             "(and --no_init_embeddings, since their embeddings cannot all initialise the student's).")
        hidden = next(iter(widths.values()))
    if script_args.init_embeddings:
        other = {name: width for name, width in widths.items() if width != hidden}
        if other:
            raise ValueError(f"Teacher embedding widths {other} differ from the student's {hidden}: their embeddings "
                             "cannot initialise the student's. Pass --no_init_embeddings or a matching --student_hidden_size.")
    heads = script_args.student_num_attention_heads or max(1, hidden // 64)
    return build_student(
        vocabulary,
        teachers,
        hidden_size=hidden,
        num_hidden_layers=script_args.student_num_hidden_layers,
        num_attention_heads=heads,
        intermediate_size=script_args.student_intermediate_size,
        max_position_embeddings=script_args.student_max_position_embeddings,
        init_embeddings=script_args.init_embeddings,
    )


def _coverage_line(vocabulary) -> str:
    parts = []
    for report in vocabulary.coverage:
        share = report.occurrence_share
        parts.append(f"{report.teacher}: {report.vocab_mapped}/{report.vocab_size} tokens"
                     + (f", {share:.1%} of its text's tokens" if share is not None else ""))
    return f"student vocabulary: {len(vocabulary)} tokens ({'; '.join(parts)})"


# ---------------------------------------------------------------------- the command
def build_parser(full_help: bool = False, prog: str = "ki-trainer merge-distill") -> CommandParser:
    return CommandParser(
        (MergeDistillArguments, MergeDistillConfig),
        prog=prog,
        description=DESCRIPTION,
        groups=[
            ("what to merge", list(MergeDistillArguments.__dataclass_fields__)),
            ("MergeDistill options (MergeDistillConfig)", own_fields(MergeDistillConfig)),
        ],
        full_help=full_help,
    )


def run(script_args: MergeDistillArguments, args: MergeDistillConfig) -> dict[str, Any]:
    """The merge-distill job: read the text, load the teachers, build vocabulary and student, train, save.

    Returns the summary also written to ``<output_dir>/merge_distill.json``.
    """
    from ..merge_distill.trainer import MergeDistillTrainer

    entries = teacher_entries(script_args.teachers)  # before any work: a bad entry fails in milliseconds
    if not script_args.train_files:
        raise ValueError("No training text: pass --train_files FILE [FILE ...] or list `train_files:` in the run file.")
    check_launch(args)
    hide_progress_bars(bool(args.disable_tqdm))
    if args.dataloader_pin_memory and args.device.type == "cpu":
        args.dataloader_pin_memory = False  # nothing to pin on CPU (and torch warns about it)
    main_process = args.process_index == 0
    languages = list(dict.fromkeys(lang for entry in entries for lang in entry["languages"]))  # teacher order
    columns = dict(text_column=args.text_column, language_column=args.language_column, id_column=args.id_column)
    options = dict(data_format=script_args.data_format, ddtp_sources=script_args.ddtp_sources,
                   max_rows_per_language=script_args.max_rows_per_language, **columns)
    with phase("reading text", enabled=main_process):
        # Shuffled once with a fixed seed so the languages mix; the Trainer's sampler shuffles again by --seed.
        train = load_texts(script_args.train_files, languages, split="train", **options).shuffle(seed=0)
        evaluation = (load_texts(script_args.eval_files, languages, split="eval", **options)
                      if script_args.eval_files else None)
    rows = dict(sorted(Counter(train[args.language_column]).items()))
    if main_process:
        print(f"training texts per language: {rows}" + (f"; evaluation texts: {len(evaluation)}" if evaluation else ""))
    with phase(f"loading {len(entries)} teacher(s)", enabled=main_process):
        teachers = build_teachers(entries)
    with phase("building the student vocabulary and student", enabled=main_process):
        vocabulary = build_vocabulary(teachers, train, script_args, args)
        student = build_student_for(vocabulary, teachers, script_args)
    if main_process:
        print(_coverage_line(vocabulary))
    trainer = MergeDistillTrainer(model=student, args=args, teachers=teachers, vocabulary=vocabulary,
                                  train_dataset=train, eval_dataset=evaluation)
    use_row_progress(trainer)
    with phase(f"training the student ({student.num_parameters() / 1e6:.2f} M parameters) on {len(train)} texts",
               enabled=main_process):
        train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        with quiet_model_loading():
            trainer.save_model()  # a plain BertForMaskedLM + PreTrainedTokenizerFast
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    metrics: dict[str, float] = {}
    if evaluation is not None:
        with phase("evaluating", enabled=main_process):
            metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
    trainer.create_model_card()
    summary = {
        "teachers": [{"name": e["name"], "path": e["path"], "languages": e["languages"]} for e in entries],
        "train_texts_per_language": rows,
        "eval_texts": len(evaluation) if evaluation is not None else 0,
        "student_vocabulary_size": len(vocabulary),
        "student_parameters": int(student.num_parameters()),
        "coverage": vocabulary.coverage_table(),
        "train": train_result.metrics,
        "eval": metrics,
    }
    if trainer.is_world_process_zero():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "merge_distill.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Optional[Sequence[str]] = None, prog: str = "ki-trainer merge-distill") -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, args = build_parser(is_help_all(argv), prog).parse(argv)
    return run(script_args, args)
