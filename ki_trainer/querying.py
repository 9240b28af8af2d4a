"""Querying the teacher ensemble: deterministic logits and Monte-Carlo-dropout certainty.

Why it is built this way:
- MC dropout must switch the WHOLE teacher to train mode: BERT's attention dropout follows the
  module's training flag, so enabling only ``nn.Dropout`` layers misses it. The teacher goes back to
  eval mode afterwards (also if the forward raises).
- The K stochastic passes run as ONE forward over the batch repeated K times
  (``repeat_interleave``): every copy draws its own dropout mask, and on a GPU this is several
  times faster than K sequential passes. Chunks of at most ``chunk_size`` rows bound the memory.
- Everything runs under ``torch.no_grad()``; logits are cast to fp32 before any softmax.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Collection, ContextManager, Mapping, Optional, Sequence, Union

import torch

from .collator import EXAMPLE_IDS_KEY, TEACHER_INPUTS_KEY
from .guards import check_teachers_distinct
from .numerics import certainty_from_logits, certainty_from_probs, mc_statistics
from .peft_support import unwrap
from .strategies import TeacherSignals
from .teacher import Teacher

Inputs = Mapping[str, torch.Tensor]


def _forward_in_chunks(model: torch.nn.Module, inputs: Inputs, rows_per_chunk: int) -> torch.Tensor:
    batch = next(iter(inputs.values())).shape[0]
    outputs = []
    for start in range(0, batch, rows_per_chunk):
        chunk = {key: value[start : start + rows_per_chunk] for key, value in inputs.items()}
        outputs.append(model(**chunk).logits.float())
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def output_layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear layer(s) that can produce the classification logits (their input is the pooled feature).

    Every ``nn.Linear`` whose ``out_features`` equals ``config.num_labels``: ``classifier`` for BERT,
    ``classifier.out_proj`` for RoBERTa/XLM-R, ``classifier`` after ``pre_classifier`` for DistilBERT
    (several for PEFT models, which keep one copy of the head per adapter).
    """
    config = getattr(model, "config", None) or getattr(unwrap(model), "config", None)
    num_labels = getattr(config, "num_labels", None)
    found = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not found:
        raise ValueError(
            f"Cannot find the output layer of {type(model).__name__} (a Linear with {num_labels} outputs); "
            "feature-based routers need the teacher's pooled features."
        )
    return found


@torch.no_grad()
def deterministic_logits(
    teacher: Teacher, inputs: Inputs, chunk_size: int = 512, return_features: bool = False
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Eval-mode logits ``[B, C_t]`` in fp32 (with the teacher's adapter active, for adapter teachers); with
    ``return_features`` also the pooled features ``[B, D_t]`` (the input of the output layer, fp32)."""
    with teacher.activated() as model:
        model.eval()
        if not return_features:
            return _forward_in_chunks(model, inputs, chunk_size)
        captured: list[torch.Tensor] = []
        # Every candidate output layer is hooked: PEFT keeps one copy of the head per adapter and runs only the
        # active one.
        handles = [
            layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().float()))
            for layer in output_layers(model)
        ]
        try:
            logits = _forward_in_chunks(model, inputs, chunk_size)
        finally:
            for handle in handles:
                handle.remove()
    features = captured[0] if len(captured) == 1 else torch.cat(captured)
    features = features[:, 0] if features.dim() == 3 else features  # heads that take the sequence: first token
    if features.shape[0] != logits.shape[0]:
        raise RuntimeError(f"Could not identify the output layer of teacher {teacher.name!r} for its pooled features.")
    return logits, features


_LAYER_STACKS = ("encoder.layer", "encoder.layers", "layers", "layer", "transformer.layer", "h")


def find_layer_stack(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of transformer blocks (``encoder.layer`` for BERT, RoBERTa, XLM-R, MPNet ...), also
    inside PEFT wrappers."""
    model = unwrap(model)
    base = getattr(model, "base_model", model)
    for path in _LAYER_STACKS:
        found = base
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, torch.nn.ModuleList) and len(found) > 0:
            return found
    raise ValueError(
        f"Cannot find the transformer layers of {type(model).__name__} (looked for {_LAYER_STACKS}); "
        "top-layer MC dropout needs them. Use mc_top_layers=None (full MC dropout)."
    )


@contextmanager
def _stochastic_top(model: torch.nn.Module, top_layers: Optional[int], num_samples: int, batch_size: Callable[[], int]):
    """Dropout on, except (with ``top_layers``) in the embeddings and lower layers, which then run once
    per example: pre-hooks on the sampled layers repeat every tensor argument with one row per
    example (hidden states entering the first one, attention masks, position biases) ``num_samples``
    times. Requires ``num_samples > 1`` to tell repeated from unrepeated rows."""
    model.train()
    handles = []
    try:
        if top_layers is not None:
            layers = find_layer_stack(model)
            if not 1 <= top_layers <= len(layers):
                raise ValueError(f"mc_top_layers={top_layers} but the teacher has {len(layers)} layers.")
            lower = list(layers)[: len(layers) - top_layers]
            for module in lower + [getattr(unwrap(model).base_model, "embeddings", torch.nn.Identity())]:
                module.eval()

            def expand(module, args, kwargs):
                rows = batch_size()

                def repeat(x):
                    is_batch = torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == rows
                    return x.repeat_interleave(num_samples, dim=0) if is_batch else x

                return tuple(repeat(a) for a in args), {k: repeat(v) for k, v in kwargs.items()}

            # Every sampled layer gets the hook: the encoder hands each layer its ORIGINAL mask, while
            # hidden states are already repeated after the first one (and are then left alone).
            handles = [layer.register_forward_pre_hook(expand, with_kwargs=True) for layer in layers[len(lower) :]]
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.eval()


@torch.no_grad()
def mc_dropout_statistics(
    teacher: Teacher, inputs: Inputs, num_samples: int, chunk_size: int = 512, top_layers: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """``num_samples`` dropout-on passes summarised by :func:`~ki_trainer.numerics.mc_statistics`.

    The batch is repeated ``num_samples`` times row-wise; each chunk holds whole examples (all K
    copies) so the per-example statistics never straddle two forwards. With ``top_layers=m`` only the
    last m transformer layers (and the head) are sampled: the rows are repeated just before them,
    so the lower layers are computed once per example.
    """
    batch = next(iter(inputs.values())).shape[0]
    examples_per_chunk = max(1, chunk_size // num_samples)
    if num_samples == 1:
        top_layers = None  # one sample: nothing to share
    current = [0]
    repeat_inputs = 1 if top_layers is not None else num_samples
    parts: list[dict[str, torch.Tensor]] = []
    with teacher.activated(), _stochastic_top(teacher.model, top_layers, num_samples, lambda: current[0]):
        for start in range(0, batch, examples_per_chunk):
            chunk = {
                key: value[start : start + examples_per_chunk].repeat_interleave(repeat_inputs, dim=0)
                for key, value in inputs.items()
            }
            current[0] = next(iter(chunk.values())).shape[0]
            parts.append(mc_statistics(teacher.model(**chunk).logits, num_samples))
    if len(parts) == 1:
        return parts[0]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def mc_dropout_probs(
    teacher: Teacher, inputs: Inputs, num_samples: int, chunk_size: int = 512, top_layers: Optional[int] = None
) -> torch.Tensor:
    """Mean of ``num_samples`` dropout-on softmax outputs, ``[B, C_t]`` in fp32 (see :func:`mc_dropout_statistics`)."""
    return mc_dropout_statistics(teacher, inputs, num_samples, chunk_size, top_layers)["mean"]


class TeacherNaNError(FloatingPointError):
    """A teacher produced NaN/inf logits: its weights or inputs are broken; training would be silently wrong."""


def query_teachers(
    teachers: Sequence[Teacher],
    teacher_inputs: Sequence[Inputs],
    certainty_source: Optional[str],
    mc_samples: int = 16,
    chunk_size: int = 512,
    autocast: Callable[[], ContextManager] = nullcontext,
    check_finite: bool = True,
    mc_top_layers: Optional[int] = None,
    row_ids: Optional[Sequence[str]] = None,
    features: bool = False,
) -> TeacherSignals:
    """Compute the :class:`TeacherSignals` a strategy asks for.

    Args:
        teachers: the prepared teachers.
        teacher_inputs: for each teacher, the (device-resident) inputs its forward takes.
        certainty_source: ``None``, ``"deterministic"`` or ``"mc"``.
        autocast: context manager factory wrapping the teacher forwards (e.g. Accelerate's autocast).
        check_finite: raise :class:`TeacherNaNError` on NaN/inf logits (one device sync).
        mc_top_layers: sample dropout only in the last m layers (lower layers computed once).
        row_ids: the batch's example ids, named in a NaN/inf error (else the rows' batch positions).
        features: also return each teacher's pooled features (the input of its output layer).

    With ``certainty_source="mc"`` the signals also carry the MC mutual information and the variance
    of the top-class probability (free: the same K passes).
    """
    if certainty_source not in (None, "deterministic", "mc"):
        raise ValueError(f"Unknown certainty source {certainty_source!r}.")
    logits, certainty, information, variance, pooled = [], [], [], [], []
    with autocast():
        for teacher, inputs in zip(teachers, teacher_inputs):
            if features:
                teacher_logits, teacher_features = deterministic_logits(teacher, inputs, chunk_size, return_features=True)
                pooled.append(teacher_features)
            else:
                teacher_logits = deterministic_logits(teacher, inputs, chunk_size)
            if teacher_logits.shape[-1] != len(teacher.labels):
                raise ValueError(
                    f"Teacher {teacher.name!r} outputs {teacher_logits.shape[-1]} logits per row but has "
                    f"{len(teacher.labels)} label names {teacher.labels}: its head and its config.id2label (or "
                    "labels=) disagree. Give one name per output: Teacher(..., labels=[...])."
                )
            logits.append(teacher_logits)
            if certainty_source == "mc":
                stats = mc_dropout_statistics(teacher, inputs, mc_samples, chunk_size, top_layers=mc_top_layers)
                certainty.append(certainty_from_probs(stats["mean"]))
                information.append(stats["mutual_information"])
                variance.append(stats["top_variance"])
            elif certainty_source == "deterministic":
                certainty.append(certainty_from_logits(teacher_logits))
    if check_finite:
        finite = torch.stack([torch.isfinite(x).all() for x in logits + certainty + pooled]).all()
        if not bool(finite):
            raise TeacherNaNError(_non_finite_message(teachers, logits, certainty, row_ids, pooled=pooled))
    return TeacherSignals(
        logits=logits,
        certainty=torch.stack(certainty, dim=1) if certainty else None,
        mutual_information=torch.stack(information, dim=1) if information else None,
        top_variance=torch.stack(variance, dim=1) if variance else None,
        features=pooled or None,
    )


def _non_finite_message(
    teachers: Sequence[Teacher], logits: list, certainty: list, row_ids: Optional[Sequence[str]], shown: int = 10,
    pooled: Sequence[torch.Tensor] = (),
) -> str:
    """Which teacher produced NaN/inf on which rows (example ids when known, else batch positions)."""
    parts = []
    for t, teacher in enumerate(teachers):
        bad = ~torch.isfinite(logits[t]).all(1)
        if certainty:
            bad |= ~torch.isfinite(certainty[t])
        in_features = ~torch.isfinite(pooled[t]).all(1) if pooled else torch.zeros_like(bad)
        what = " (in its pooled features, the router's input, while its logits are finite)" if bool(
            (in_features & ~bad).any()) else ""
        bad |= in_features
        rows = bad.nonzero().flatten().tolist()
        if not rows:
            continue
        if row_ids is not None:
            where = f"example ids {[row_ids[r] for r in rows[:shown]]}"
        else:
            where = f"rows {rows[:shown]} of the batch (no example ids: set signal_source='cached' and an id column)"
        more = f" and {len(rows) - shown} more" if len(rows) > shown else ""
        parts.append(f"teacher {teacher.name!r} on {where}{more}{what}")
    return (
        f"NaN/inf teacher outputs: {'; '.join(parts) or 'unknown rows'}. Check the teachers' weights (e.g. fp16 "
        "overflow: try teacher_dtype='bfloat16' or 'float32') and these inputs."
    )


def to_device(data, device: torch.device):
    """Tensors in nested dicts / lists / tuples moved to ``device`` (anything else unchanged), as the Trainer
    prepares a batch."""
    if isinstance(data, Mapping):
        return type(data)({k: to_device(v, device) for k, v in data.items()})
    if isinstance(data, (tuple, list)):
        return type(data)(to_device(v, device) for v in data)
    if isinstance(data, torch.Tensor):
        return data.to(device=device)
    return data


class TeacherQuerier:
    """The teachers bound to what querying them takes: the inputs each accepts (the collator says which encoding
    is whose), the run's Monte-Carlo settings (``args``), the autocast context and the device.

    The trainer queries a training batch with :meth:`signals`; the signal cache's precompute queries raw rows
    with :meth:`rows`. Neither calls back into the trainer.
    """

    def __init__(self, teachers: Sequence[Teacher], collator, args, autocast: Callable[[], ContextManager],
                 device: torch.device) -> None:
        self.teachers = teachers
        self.collator = collator
        self.args = args
        self.autocast = autocast
        self.device = device
        self.accepted = [teacher.accepted_inputs() for teacher in teachers]

    def teacher_inputs(self, student_inputs: dict, teacher_batches: dict) -> list[dict]:
        """Each teacher's forward inputs: its own encoding when the collator made one, else the student's."""
        key_of = getattr(self.collator, "teacher_input_key", lambda t: None)
        per_teacher = []
        for t, accepted in enumerate(self.accepted):
            key = key_of(t)
            source = student_inputs if key is None else teacher_batches[key]
            per_teacher.append({k: v for k, v in source.items() if k in accepted})
        return per_teacher

    def signals(self, student_inputs: dict, teacher_batches: Optional[dict] = None,
                certainty_source: Optional[str] = None, example_ids: Optional[Sequence[str]] = None,
                features: bool = False) -> TeacherSignals:
        """Query the ensemble (no gradients) on a collated batch. ``example_ids`` are named in a NaN/inf error;
        ``features`` adds each teacher's pooled features."""
        args = self.args
        return query_teachers(
            self.teachers,
            self.teacher_inputs(student_inputs, teacher_batches or {}),
            certainty_source=certainty_source,
            mc_samples=args.mc_samples,
            chunk_size=args.mc_chunk_size,
            autocast=self.autocast,
            check_finite=args.check_teacher_outputs,
            mc_top_layers=args.mc_top_layers,
            row_ids=example_ids,
            features=features,
        )

    def rows(self, rows: list[dict], ids: Sequence[str], seed: Optional[int] = None, mc: bool = True,
             features: Optional[bool] = False) -> TeacherSignals:
        """The signals of raw dataset rows (collated here): MC ones when ``mc``, with dropout seeded by ``seed``."""
        batch = to_device(self.collator(rows), self.device)
        teacher_batches = batch.pop(TEACHER_INPUTS_KEY, {})
        student_inputs = {k: v for k, v in batch.items() if k not in ("labels", EXAMPLE_IDS_KEY)}
        if seed is not None:
            torch.manual_seed(seed)
        return self.signals(student_inputs, teacher_batches, "mc" if mc else None, list(ids), bool(features))



def ensemble(teachers: Sequence) -> list[Teacher]:
    """The teachers as :class:`Teacher` objects (paths / ids / models wrapped), checked distinct, with unique
    names (a repeated or missing name gets its position)."""
    if not teachers:
        raise ValueError("KnowledgeIntegrationTrainer needs at least one teacher (teachers=[Teacher(...), ...]).")
    teachers = [t if isinstance(t, Teacher) else Teacher(t) for t in teachers]
    check_teachers_distinct(teachers)
    seen = set()
    for i, teacher in enumerate(teachers):
        name = teacher.name or f"teacher_{i}"
        if name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        teacher.name = name
    return teachers


def place_teachers(teachers: Sequence[Teacher], device: torch.device, dtype: torch.dtype) -> None:
    """Move and cast every teacher for querying (adapter teachers of one base share its one cast copy)."""
    prepared: dict[int, torch.nn.Module] = {}
    for teacher in teachers:
        original = id(teacher.model)
        if original in prepared:
            teacher.model = prepared[original]
        prepared[original] = teacher.prepare(device, dtype).model
