"""Start the student from its teachers' weights instead of the pretrained checkpoint (``student_init``).

When the teachers were fine-tuned from ONE base checkpoint and the student has that architecture and
vocabulary, the teachers' encoders can be averaged weight by weight (a "model soup" of task-specific
fine-tunes) and their classification heads stacked over the union labels. The student then starts from
features that already separate every teacher's classes, and distillation only has to reconcile them.
Measured on debian_sections20 (docs/routing.md, "Student initialisation"; MUKI + relative_mahalanobis):
+1.7 points over the pretrained start merging two teachers (3 seeds), +2.5 on another pair, but -4.2 merging
four teachers (heads trained alone do not compare with each other); averaging only the encoder and keeping the
student's fresh head (``stack_heads=False``, ``student_init="teacher_average_encoder"``) gave +0.6 merging four
and +0.7 / +1.2 on the two pairs (3 seeds each).
Opt-in for that reason.

Only the weights are read: no data, no labels. Nothing here runs for ``student_init="pretrained"``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .label_space import LabelSpace
from .peft_support import is_peft_model, unwrap
from .teacher import Teacher


def _vocabulary(tokenizer) -> dict[str, int] | None:
    get_vocab = getattr(tokenizer, "get_vocab", None)
    return get_vocab() if callable(get_vocab) else None


# Config fields that change what the same weights compute (attention heads, activation, norm, positions) or how
# many weights there are; a teacher must agree with the student on every one that either config sets.
STRUCTURE_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "hidden_act", "activation", "activation_function", "layer_norm_eps", "rms_norm_eps",
    "position_embedding_type", "max_position_embeddings", "type_vocab_size", "vocab_size", "rope_theta",
    "n_heads", "n_layers", "dim", "hidden_dim", "sinusoidal_pos_embds", "relative_attention_num_buckets",
    "relative_attention_max_distance", "normalize_before", "pre_norm",
)


def _structure_differences(student_config, teacher_config) -> list[str]:
    """``"field: teacher value vs student value"`` for each structural config field the two disagree on."""
    student_fields = student_config.to_dict() if student_config is not None else {}
    teacher_fields = teacher_config.to_dict() if teacher_config is not None else {}
    return [f"{key}={teacher_fields.get(key)!r} (student: {student_fields.get(key)!r})" for key in STRUCTURE_FIELDS
            if (key in student_fields or key in teacher_fields) and student_fields.get(key) != teacher_fields.get(key)]


def check_compatible(
    student: torch.nn.Module, teachers: Sequence[Teacher], label_space: LabelSpace, student_tokenizer=None
) -> None:
    """Raise a ValueError naming the first teacher whose weights cannot be averaged into ``student``."""
    student = unwrap(student)
    own = {name: tensor.shape for name, tensor in student.state_dict().items()}
    student_vocab = _vocabulary(student_tokenizer) if student_tokenizer is not None else None
    for teacher in teachers:
        if teacher.adapter is not None or is_peft_model(teacher.model):
            raise ValueError(
                f"student_init='teacher_average' averages full models, but teacher {teacher.name!r} is a PEFT "
                "adapter. Merge it first (model.merge_and_unload()) or use student_init='pretrained'."
            )
        theirs = teacher.model.state_dict()
        if type(teacher.model).__name__ != type(student).__name__:
            raise ValueError(
                f"student_init='teacher_average' needs teachers of the student's architecture: teacher "
                f"{teacher.name!r} is a {type(teacher.model).__name__}, the student a {type(student).__name__}."
            )
        missing = [name for name in own if name not in theirs]
        if missing:
            raise ValueError(
                f"student_init='teacher_average': teacher {teacher.name!r} has no weight(s) {missing[:3]} of the "
                "student. Teachers and student must share one architecture."
            )
        extra = [name for name in theirs if name not in own]
        if extra:
            raise ValueError(
                f"student_init='teacher_average': teacher {teacher.name!r} has {len(extra)} weight(s) the student "
                f"lacks ({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}), e.g. more layers; averaging would "
                "drop them. Teachers and student must share one architecture."
            )
        differences = _structure_differences(getattr(student, "config", None), getattr(teacher.model, "config", None))
        if differences:
            raise ValueError(
                f"student_init='teacher_average': teacher {teacher.name!r} is built differently from the student: "
                f"{'; '.join(differences)}. Weights of equal shape would compute other functions; teachers and "
                "student must share one architecture."
            )
        head = [name for name, shape in own.items() if theirs[name].shape != shape]
        bad = [name for name in head if not _is_label_rows(own[name], theirs[name].shape, len(teacher.labels))]
        if bad:
            raise ValueError(
                f"student_init='teacher_average': weight {bad[0]!r} of teacher {teacher.name!r} has shape "
                f"{tuple(theirs[bad[0]].shape)}, the student's {tuple(own[bad[0]])}. Only the output layer (one "
                "row per label) may differ: the teachers must be fine-tunes of the student's base checkpoint."
            )
        if not head and list(teacher.labels) != list(label_space.labels):
            raise ValueError(
                f"student_init='teacher_average': teacher {teacher.name!r} predicts every union label but in its own "
                f"order {list(teacher.labels)}; averaging its output layer would mix labels. Give the teachers the "
                "union's label order or use student_init='pretrained'."
            )
        if teacher.tokenizer is not None and student_vocab is not None:
            if _vocabulary(teacher.tokenizer) != student_vocab:
                raise ValueError(
                    f"student_init='teacher_average': teacher {teacher.name!r} has its own vocabulary; averaging "
                    "embeddings of different vocabularies mixes unrelated tokens. Use student_init='pretrained'."
                )


def _is_label_rows(student_shape: torch.Size, teacher_shape: torch.Size, teacher_labels: int) -> bool:
    return (len(student_shape) == len(teacher_shape) and len(teacher_shape) >= 1
            and teacher_shape[0] == teacher_labels and tuple(teacher_shape[1:]) == tuple(student_shape[1:]))


MAX_DISTANCE = 0.5


@torch.no_grad()
def check_common_base(teachers: Sequence[Teacher], sources: list[dict], targets: dict) -> list[float]:
    """Each teacher's relative L2 distance to the teachers' mean over the averaged weight matrices; a ValueError
    above ``MAX_DISTANCE``.

    Fine-tunes of one checkpoint stay close to each other (measured on the weight matrices: paraphrase-MiniLM-L3-v2
    teachers fine-tuned for 3 epochs on debian_sections20 lie 0.012-0.014 from their mean), while independently
    initialised models of one architecture lie about 1 apart, and their average is not a model of anything.
    """
    names = [name for name, target in targets.items()  # matrices: norm weights start at 1 in every model
             if target.is_floating_point() and target.dim() >= 2 and all(source[name].shape == target.shape for source in sources)]
    if len(teachers) < 2 or not names:
        return [0.0] * len(teachers)
    squared = [0.0] * len(teachers)
    norm = 0.0
    for name in names:
        values = [source[name].detach().float().cpu() for source in sources]
        mean = torch.stack(values).mean(0)
        norm += float(mean.pow(2).sum())
        for t, value in enumerate(values):
            squared[t] += float((value - mean).pow(2).sum())
    distances = [(d / max(norm, 1e-12)) ** 0.5 for d in squared]
    far = [(teacher.name, round(d, 3)) for teacher, d in zip(teachers, distances) if d > MAX_DISTANCE]
    if far:
        raise ValueError(
            f"student_init='teacher_average': teachers {far} lie far from the teachers' mean (relative L2 distance; "
            f"fine-tunes of one checkpoint lie within a few hundredths, unrelated models ~1, the limit is {MAX_DISTANCE}). They do not "
            "look like fine-tunes of one base checkpoint, and averaging them would not give a working model. Use "
            "student_init='pretrained'."
        )
    return distances


@torch.no_grad()
def average_teachers_into(
    student: torch.nn.Module, teachers: Sequence[Teacher], label_space: LabelSpace, student_tokenizer=None,
    stack_heads: bool = True,
) -> dict[str, int]:
    """Overwrite ``student``'s weights with the teachers' average; stack their output rows per union label.

    Weights of equal shape in the student and every teacher are averaged (fp32, then cast to the student's
    dtype). Output-layer weights (one row per label, e.g. ``classifier.weight`` / ``classifier.bias``) are
    copied row by row from the teacher that owns each union label (a label owned by several teachers gets
    the mean of their rows), or, with ``stack_heads=False``, left as the student's own fresh output layer.
    Returns counts ``{"averaged": ..., "stacked": ...}``.
    """
    check_compatible(student, teachers, label_space, student_tokenizer)
    model = unwrap(student)
    targets = model.state_dict()
    sources = [teacher.model.state_dict() for teacher in teachers]
    check_common_base(teachers, sources, targets)
    averaged = stacked = 0
    for name, target in targets.items():
        values = [source[name] for source in sources]
        if all(value.shape == target.shape for value in values):
            if not target.is_floating_point():
                continue  # e.g. position_ids buffers: identical by construction, keep the student's
            target.copy_(torch.stack([value.detach().float().cpu() for value in values]).mean(0).to(target.dtype))
            averaged += 1
            continue
        if not stack_heads:
            continue
        rows = torch.zeros(target.shape, dtype=torch.float32)
        owners = torch.zeros(target.shape[0], dtype=torch.float32)
        for teacher, value in zip(teachers, values):
            value = value.detach().float().cpu()
            for own_index, label in enumerate(teacher.labels):
                union_index = label_space.label2id[label]
                rows[union_index] += value[own_index]
                owners[union_index] += 1
        if bool((owners == 0).any()):
            raise ValueError(f"student_init='teacher_average': no teacher gives rows of {name!r} for every union label.")
        shape = (-1,) + (1,) * (rows.dim() - 1)
        target.copy_((rows / owners.view(shape)).to(target.dtype))
        stacked += 1
    return {"averaged": averaged, "stacked": stacked}
