"""The student masked LM over the student vocabulary: a fresh encoder, or one started from a teacher.

Starts (``build_student(init=...)``):

- ``"fresh"``: a new ``BertForMaskedLM`` of the given size; its word embeddings come from the teachers
  (:func:`init_student_embeddings`) when their width matches.
- ``"teacher"``: a copy of one teacher's masked LM (``init_teacher``) with all its layers or every k-th
  (``layer_stride``, counted from the top so the layer the head was trained on is kept, as DistilBERT
  starts from its teacher); embeddings, position embeddings and the MLM head come from that teacher,
  word embeddings and output bias re-indexed to the student vocabulary.

Word embeddings of student tokens (:func:`init_student_embeddings`): a token the reference teacher owns
takes its row; a token only other teachers own takes their row mapped into the reference's space by
a linear map fitted by ridge-regularised least squares on the tokens both own (averaging rows of two
unrelated embedding spaces gives vectors that mean nothing in either).
"""

from __future__ import annotations

import copy
import re
from typing import Optional, Sequence, Union

import torch
from transformers import BertConfig, BertForMaskedLM

from .teacher import MaskedLMTeacher
from .vocabulary import StudentVocabulary

STUDENT_INITS = ("fresh", "teacher")


def _owned(vocabulary: StudentVocabulary, t: int, rows: int) -> dict[int, int]:
    """Student id -> teacher id of teacher ``t`` (the first owner row where several map)."""
    out: dict[int, int] = {}
    for s, owners in vocabulary.owners.items():
        for owner, i in owners:
            if owner == t and i < rows and s not in out:
                out[s] = i
    return out


def fit_linear_map(source: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """``W`` (last row: the bias) minimising ``|[source, 1] W - target|^2 + lambda |W[:-1]|^2`` in fp64, with
    ``lambda = ridge * mean(diag(source^T source))`` (scale-free; the bias is not penalised)."""
    x = torch.cat([source.double(), torch.ones(len(source), 1, dtype=torch.float64)], dim=1)
    y = target.double()
    gram = x.T @ x
    penalty = torch.eye(len(gram), dtype=torch.float64) * ridge * float(torch.diagonal(gram)[:-1].mean())
    penalty[-1, -1] = 0.0
    return torch.linalg.solve(gram + penalty, x.T @ y)


def init_student_embeddings(
    student,
    vocabulary: StudentVocabulary,
    teachers: Sequence[MaskedLMTeacher],
    reference: Optional[int] = None,
    min_shared: int = 32,
) -> dict:
    """Initialise the student's word embeddings from the teachers' (see the module docstring).

    Args:
        reference: index of the teacher whose embedding space the student uses (default: the teacher
            owning the most student tokens). Its width must equal the student's.
        min_shared: fewest tokens both teachers own for a linear map to be fitted; with fewer, that
            teacher's rows are not used.

    Returns ``{"reference", "owned", "mapped", "unset", "maps": {teacher: fit residual}}``.

    Raises ValueError if the reference teacher's embedding width differs from the student's.
    """
    target = student.get_input_embeddings().weight
    rows = len(target)
    sources = [t.model.get_input_embeddings().weight.detach().float().cpu() for t in teachers]
    owned = [_owned(vocabulary, t, len(src)) for t, src in enumerate(sources)]
    if reference is None:
        reference = max(range(len(teachers)), key=lambda t: len(owned[t]))
    ref = sources[reference]
    if ref.shape[1] != target.shape[1]:
        raise ValueError(
            f"Teacher {teachers[reference].name!r} embeds tokens in {ref.shape[1]} dimensions, the student in "
            f"{target.shape[1]}: its embeddings cannot initialise the student's. Use init_embeddings=False or "
            "a student of that hidden size."
        )
    values = torch.zeros((rows, ref.shape[1]))
    counts = torch.zeros(rows)
    ref_ids = {s: i for s, i in owned[reference].items() if s < rows}
    if ref_ids:
        s_idx = torch.tensor(list(ref_ids)), torch.tensor(list(ref_ids.values()))
        values[s_idx[0]] = ref[s_idx[1]]
        counts[s_idx[0]] = 1
    fits = {}
    mapped_sum = torch.zeros_like(values)
    mapped_count = torch.zeros(rows)
    for t, src in enumerate(sources):
        if t == reference:
            continue
        specials = set(vocabulary.special_ids.values())
        shared = [s for s in owned[t] if s in ref_ids and s not in specials]  # special rows are unrelated roles
        extra = [s for s in owned[t] if s not in ref_ids and s < rows]
        if not extra:
            continue
        if len(shared) < min_shared:
            fits[teachers[t].name] = None
            continue
        x = src[torch.tensor([owned[t][s] for s in shared])]
        y = ref[torch.tensor([ref_ids[s] for s in shared])]
        w = fit_linear_map(x, y)
        residual = float(((torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1) @ w - y.double()).norm()
                          / y.double().norm()))
        fits[teachers[t].name] = round(residual, 4)
        xe = src[torch.tensor([owned[t][s] for s in extra])].double()
        mapped = (torch.cat([xe, torch.ones(len(xe), 1, dtype=torch.float64)], 1) @ w).float()
        idx = torch.tensor(extra)
        mapped_sum.index_add_(0, idx, mapped)
        mapped_count.index_add_(0, idx, torch.ones(len(extra)))
    use_mapped = (counts == 0) & (mapped_count > 0)
    values[use_mapped] = mapped_sum[use_mapped] / mapped_count[use_mapped, None]
    done = (counts > 0) | use_mapped
    with torch.no_grad():
        target[done] = values[done].to(target.dtype)
    return {"reference": teachers[reference].name, "owned": int((counts > 0).sum()), "mapped": int(use_mapped.sum()),
            "unset": int((~done).sum()), "maps": fits}


def _teacher_layers(n: int, layer_stride: int) -> list[int]:
    """Every ``layer_stride``-th of ``n`` layers, counted from the top (the top layer is always kept)."""
    if layer_stride < 1:
        raise ValueError(f"layer_stride must be >= 1, got {layer_stride}.")
    return sorted(range(n - 1, -1, -layer_stride))


def student_from_teacher(
    vocabulary: StudentVocabulary,
    teachers: Sequence[MaskedLMTeacher],
    teacher: Union[int, str],
    layer_stride: int = 1,
    seed: int = 0,
    max_position_embeddings: Optional[int] = None,
):
    """A copy of teacher ``teacher``'s masked LM (every ``layer_stride``-th layer) over the student vocabulary."""
    names = [t.name for t in teachers]
    index = names.index(teacher) if isinstance(teacher, str) else int(teacher)
    if isinstance(teacher, str) and teacher not in names:
        raise ValueError(f"init_teacher {teacher!r} is not a teacher; teachers are {names}.")
    source = teachers[index].model
    config = copy.deepcopy(source.config)
    n = int(config.num_hidden_layers)
    layers = _teacher_layers(n, layer_stride)
    teacher_vocab = source.get_input_embeddings().weight.shape[0]
    config.num_hidden_layers = len(layers)
    config.vocab_size = len(vocabulary)
    config.tie_word_embeddings = True
    config.pad_token_id = vocabulary.special_ids["pad"]
    if max_position_embeddings is not None and max_position_embeddings < config.max_position_embeddings:
        pass  # positions are copied whole; the trainer truncates to the limits
    torch.manual_seed(seed)
    student = type(source)(config)
    state = {}
    for key, value in source.state_dict().items():
        if value.ndim >= 1 and value.shape[0] == teacher_vocab and ("word_embeddings" in key or "decoder" in key or key.endswith("bias") and "predictions" in key or key.endswith("lm_head.bias")):
            continue  # vocabulary-sized: re-indexed below
        match = re.search(r"\.layer\.(\d+)\.", key)
        if match:
            i = int(match.group(1))
            if i not in layers:
                continue
            key = key.replace(f".layer.{i}.", f".layer.{layers.index(i)}.", 1)
        state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    leftover = [k for k in missing if not ("word_embeddings" in k or "decoder" in k or k.endswith("bias"))]
    if unexpected or leftover:
        raise ValueError(f"Cannot start the student from {names[index]!r}: missing {leftover[:5]}, unexpected {list(unexpected)[:5]}.")
    report = init_student_embeddings(student, vocabulary, teachers, reference=index)
    # output bias: the teacher's where it owns the token, its mean elsewhere
    head_bias = _output_bias(source)
    student_bias = _output_bias(student)
    if head_bias is not None and student_bias is not None:
        with torch.no_grad():
            student_bias.fill_(float(head_bias.detach().float().mean()))
            own = _owned(vocabulary, index, len(head_bias))
            if own:
                student_bias[torch.tensor(list(own))] = head_bias.detach()[torch.tensor(list(own.values()))].to(student_bias.dtype)
    student.tie_weights()
    student.config.ki_student_init = {"init": "teacher", "teacher": names[index], "layers": layers, "of": n, **report}
    return student


def _output_bias(model) -> Optional[torch.nn.Parameter]:
    decoder = model.get_output_embeddings()
    if getattr(decoder, "bias", None) is not None:
        return decoder.bias
    head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
    return getattr(getattr(head, "predictions", head), "bias", None)


def build_student(
    vocabulary: StudentVocabulary,
    teachers: Optional[Sequence[MaskedLMTeacher]] = None,
    *,
    init: str = "fresh",
    init_teacher: Union[int, str, None] = None,
    layer_stride: int = 1,
    hidden_size: int = 384,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 6,
    intermediate_size: Optional[int] = None,
    max_position_embeddings: int = 512,
    init_embeddings: bool = True,
    seed: int = 0,
    **config_overrides,
):
    """The student masked LM (decoder tied to the input embeddings) over ``vocabulary``.

    Args:
        init: ``"fresh"`` (a new ``BertForMaskedLM`` of the size given by the next arguments; word embeddings
            from the teachers when ``init_embeddings``) or ``"teacher"`` (a copy of teacher ``init_teacher``,
            default the first, with every ``layer_stride``-th layer; the size arguments are then ignored).
        seed: initialises everything not copied from a teacher.
    """
    if init not in STUDENT_INITS:
        raise ValueError(f"init must be one of {STUDENT_INITS}, got {init!r}.")
    if init == "teacher":
        if not teachers:
            raise ValueError("init='teacher' needs the teachers (teachers=[...]).")
        return student_from_teacher(vocabulary, teachers, 0 if init_teacher is None else init_teacher,
                                    layer_stride=layer_stride, seed=seed)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocabulary),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=vocabulary.special_ids["pad"],
        tie_word_embeddings=True,
        **config_overrides,
    )
    student = BertForMaskedLM(config)
    if init_embeddings and teachers:
        report = init_student_embeddings(student, vocabulary, teachers)
        student.config.ki_student_init = {"init": "fresh", **report}
    return student
