"""Preparing the student: built from a path / Hub id or adopted as an instance, labelled with the union's
labels (in the student's own order when it already names them), checked against its tokenizer,
initialised from the teachers (``student_init``) and wrapped with PEFT.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    enable_full_determinism,
    set_seed,
)
from transformers.utils import logging

from .console import describe_new_head, quiet_model_loading
from .label_space import LabelSpace
from .peft_support import unwrap, wrap_student
from .student_init import average_teachers_into
from .teacher import Teacher

logger = logging.get_logger(__name__)

_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


def config_labels(config) -> Optional[list[str]]:
    """A config's label names in id order, or ``None`` when it has none or only generic ``LABEL_i``."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    if not names or all(_GENERIC_LABEL.match(name) for name in names):
        return None
    return names


def student_label_order(config, teachers: Sequence[Teacher], strict: bool) -> Optional[list[str]]:
    """The student's own label order when its config names exactly the teachers' union labels.

    ``None`` (take the union's first-seen order) when it has no names or generic ``LABEL_i``. When it
    names other labels: a clear error for a student instance (``strict``; its predictions would be
    decoded with the wrong names), a fresh head for a checkpoint loaded by path.
    """
    names = config_labels(config)
    union = list(dict.fromkeys(label for teacher in teachers for label in teacher.labels))
    if names is None:
        return None
    if len(names) == len(union) and sorted(names) == sorted(union):
        return names
    if not strict:
        logger.info(f"The student checkpoint's labels {names} are not the teachers' union {union}: new head.")
        return None
    if len(names) != len(union):
        return None  # adopt_union_labels reports the class-count mismatch
    raise ValueError(
        f"The student's config.id2label names {names}, but the teachers' union labels are {union} "
        f"(not in the student: {sorted(set(union) - set(names))}; not owned by any teacher: "
        f"{sorted(set(names) - set(union))}). Labels are matched by name: give the student id2label over "
        f"exactly the union's names (in the order you want), or no names (num_labels={len(union)}) to take "
        "the union's order."
    )


def label_space_for(config, teachers: Sequence[Teacher], strict: bool) -> LabelSpace:
    """The union label space of ``teachers``, in the student's own order where its ``config`` names them."""
    order = student_label_order(config, teachers, strict=strict)
    return LabelSpace([t.labels for t in teachers], [t.name for t in teachers], labels=order)


def adopt_union_labels(model: torch.nn.Module, label_space: LabelSpace) -> None:
    """Give a student instance the union's ``id2label`` / ``label2id`` (its class count must match)."""
    config = getattr(unwrap(model), "config", None)
    num_labels = getattr(config, "num_labels", None)
    if num_labels != label_space.num_labels:
        raise ValueError(
            f"The student has {num_labels} output classes but the teachers' union has "
            f"{label_space.num_labels}: {label_space.labels}. Build it with "
            f"num_labels={label_space.num_labels}, or pass a path/Hub id and let the trainer build it."
        )
    problem = getattr(config, "problem_type", None)
    if problem not in (None, "single_label_classification"):
        raise ValueError(
            f"The student is a {problem!r} model (config.problem_type): knowledge integration trains a single-label "
            "(softmax) classifier, and saved with this problem_type it would be read with other semantics (e.g. "
            "sigmoids). Set model.config.problem_type = 'single_label_classification', or pass its path."
        )
    config.id2label = dict(label_space.id2label)
    config.label2id = dict(label_space.label2id)


def load_student(source: str, label_space: LabelSpace) -> torch.nn.Module:
    """A ``*ForSequenceClassification`` student from a directory / Hub id, with a head over the union labels
    (the caller seeds first: the new head is initialised here)."""
    with quiet_model_loading():  # one line for the expected new head instead of the load-report table
        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=label_space.num_labels,
            id2label=label_space.id2label,
            label2id=label_space.label2id,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    if getattr(model.config, "problem_type", None) not in (None, "single_label_classification"):
        logger.warning(f"The student checkpoint {source} is a {model.config.problem_type!r} model; the student is "
                       "trained and saved as a single-label (softmax) classifier (problem_type set accordingly).")
        model.config.problem_type = "single_label_classification"
    line, not_head = describe_new_head(loading_info, label_space.num_labels, str(model.name_or_path))
    logger.info(line)
    if not_head:
        logger.warning(f"The student checkpoint lacks weights outside the classification head (newly "
                       f"initialised, train them or check the checkpoint): {not_head}")
    return model


def check_student_vocabulary(model, tokenizer) -> None:
    """A tokenizer with more tokens than the student's embedding table fails deep in torch otherwise."""
    if not isinstance(tokenizer, PreTrainedTokenizerBase) or not hasattr(model, "get_input_embeddings"):
        return
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ValueError(
            f"The student has {rows} token embeddings but its tokenizer has {len(tokenizer)} tokens: ids beyond "
            f"{rows - 1} would fail inside the forward. Use the student's own tokenizer, or call "
            "model.resize_token_embeddings(len(tokenizer)) first."
        )


def initialise_student(model: torch.nn.Module, teachers: Sequence[Teacher], label_space: LabelSpace, tokenizer,
                       student_init: str) -> None:
    """Apply ``student_init`` to a freshly built student (before PEFT wraps it)."""
    if student_init == "pretrained":
        return
    counts = average_teachers_into(model, teachers, label_space, tokenizer,
                                   stack_heads=student_init == "teacher_average")
    logger.info(f"Student initialised from the average of {len(teachers)} teachers: {counts['averaged']} "
                f"weights averaged, {counts['stacked']} output-layer weights stacked over the union labels.")


def finish_student(model: torch.nn.Module, teachers: Sequence[Teacher], label_space: LabelSpace, tokenizer,
                   args, peft_config=None) -> torch.nn.Module:
    """``student_init`` applied, then the PEFT wrapper (when ``peft_config``): the student ready to train."""
    initialise_student(model, teachers, label_space, tokenizer, args.student_init)
    return wrap_student(model, peft_config) if peft_config is not None else model


def seed_run(args) -> None:
    """Seed as the Trainer does (``full_determinism`` too): for weights initialised before ``Trainer.__init__``."""
    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)


def prepare_student(model, teachers: Sequence[Teacher], args, tokenizer=None, load_tokenizer: bool = True,
                    peft_config=None):
    """The student ready to train, from an instance or a directory / Hub id (then built with a head over the
    union labels, and its tokenizer loaded when ``load_tokenizer`` and none is given).

    Returns ``(student, label_space, source, tokenizer)``; ``source`` is the directory / Hub id it came from.
    """
    if isinstance(model, (str, os.PathLike)):
        source = str(model)
        if tokenizer is None and load_tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(source)
        label_space = label_space_for(AutoConfig.from_pretrained(source), teachers, strict=False)
        seed_run(args)  # the new head is initialised here, before Trainer.__init__ seeds
        model = load_student(source, label_space)
    else:
        config = getattr(unwrap(model), "config", None)
        source = getattr(config, "_name_or_path", None) or None
        label_space = label_space_for(config, teachers, strict=True)
        adopt_union_labels(model, label_space)
    model = finish_student(model, teachers, label_space, tokenizer, args, peft_config)
    return model, label_space, source, tokenizer


def check_student_given(model, model_init) -> None:
    """Exactly one of ``model=`` and ``model_init=``."""
    if model is None and model_init is None:
        raise ValueError(
            "Pass the student as `model=` (an instance, a directory or a Hub id), or a `model_init=` callable "
            "that builds a fresh one (needed by hyperparameter_search)."
        )
    if model is not None and model_init is not None:
        raise ValueError("Pass either `model=` or `model_init=`, not both.")


def next_student(model: torch.nn.Module, teachers: Sequence[Teacher], label_space: LabelSpace, tokenizer, args,
                 peft_config=None) -> torch.nn.Module:
    """A further student built by ``model_init`` (a ``train()`` / trial after the first), ready to train: it must
    name the labels in the order the first one fixed."""
    order = student_label_order(getattr(unwrap(model), "config", None), teachers, strict=True)
    if order is not None and order != label_space.labels:
        raise ValueError(
            f"model_init returned a student labelled {order}, but the first one fixed the order "
            f"{label_space.labels}. Build every student with the same id2label."
        )
    adopt_union_labels(model, label_space)
    return finish_student(model, teachers, label_space, tokenizer, args, peft_config)
