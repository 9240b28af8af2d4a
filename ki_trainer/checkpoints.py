"""Checkpoints that cannot lie: each one records what run it belongs to, and only complete ones resume.

Why: the stock Trainer resumes ANY ``checkpoint-N`` folder. In an output directory reused by another
run (other teachers, another strategy or label union) ``resume_from_checkpoint=True`` silently
continued the other run, and a folder cut off mid-write (a kill while saving) was picked up as the
latest. Here every checkpoint gets ``ki_fingerprint.json`` (written before the Trainer's own files,
so ``trainer_state.json``, written near the end, marks a complete checkpoint), a resume checks it,
and ``resume_from_checkpoint=True`` skips incomplete folders with a warning.

:func:`run_fingerprint` is the one place that says what identifies a run; extend it there (e.g. a
router's name and fit statistics) and every checkpoint records and checks the new field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from typing import Any, Optional

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .signal_cache.fingerprint import weights_digest  # noqa: F401  (the one weight hash; recorded per teacher)

logger = logging.get_logger(__name__)

FINGERPRINT_FILE = "ki_fingerprint.json"
TRAINER_STATE_FILE = "trainer_state.json"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another run (other teachers, labels or integration settings)."""


def run_fingerprint(trainer) -> dict[str, Any]:
    """What identifies a knowledge-integration run: the teachers (names, labels, weights), the union
    label order and the integration settings. Two runs with different fingerprints must never share a
    checkpoint. Teacher weights are hashed once per trainer (they are frozen)."""
    digests = trainer._teacher_digests
    if digests is None:
        digests = trainer._teacher_digests = [weights_digest(t.model) for t in trainer.teachers]
    args = trainer.args
    return {
        "teachers": [
            {"name": t.name, "labels": list(t.labels), "weights": digest} for t, digest in zip(trainer.teachers, digests)
        ],
        "labels": list(trainer.label_space.labels),
        "strategy": args.strategy,
        "strategy_options": dataclasses.asdict(args.strategy_options()),
        "certainty_normalization": args.certainty_normalization,
        "mc_samples": args.mc_samples,
        "mc_top_layers": args.mc_top_layers,
        "router": args.resolved_router(),
        "router_options": dict(args.router_options or {}),
        "teacher_inputs": teacher_inputs(trainer),
    }


def teacher_inputs(trainer) -> list[dict[str, Any]]:
    """What each teacher reads: its truncation length and its tokenization (fingerprint, including the side
    truncation cuts), as the run's collator encodes it. ``None`` where a custom collator decides."""
    from .collator import KnowledgeIntegrationCollator, tokenizer_fingerprint

    collator = trainer.data_collator
    if not isinstance(collator, KnowledgeIntegrationCollator):
        return [{"max_length": None, "tokenization": None} for _ in trainer.teachers]
    inputs = []
    for t in range(len(trainer.teachers)):
        key = collator.teacher_input_key(t)
        tokenizer, length = collator.groups[key] if key is not None else (collator.tokenizer, collator.max_length)
        inputs.append({"max_length": length, "tokenization": tokenizer_fingerprint(tokenizer)})
    return inputs


def write_fingerprint(checkpoint_dir: str, fingerprint: dict[str, Any]) -> None:
    os.makedirs(checkpoint_dir, exist_ok=True)
    path = os.path.join(checkpoint_dir, FINGERPRINT_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(fingerprint, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_fingerprint(checkpoint_dir: str) -> Optional[dict[str, Any]]:
    path = os.path.join(checkpoint_dir, FINGERPRINT_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def incomplete_reason(checkpoint_dir: str) -> Optional[str]:
    """Why ``checkpoint_dir`` cannot be resumed (``None`` when it is complete)."""
    if not os.path.isdir(checkpoint_dir):
        return "it does not exist"
    if read_fingerprint(checkpoint_dir) is None:
        return f"it has no readable {FINGERPRINT_FILE} (written by another trainer, or cut off while saving)"
    if not any(os.path.exists(os.path.join(checkpoint_dir, name)) for name in _WEIGHT_FILES):
        return "it has no model weights (cut off while saving)"
    try:
        with open(os.path.join(checkpoint_dir, TRAINER_STATE_FILE), encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError):
        return f"its {TRAINER_STATE_FILE} is missing or unreadable (cut off while saving)"
    for name in sorted(os.listdir(checkpoint_dir)):
        problem = _file_problem(os.path.join(checkpoint_dir, name))
        if problem is not None:
            return f"its {name} {problem} (cut off while saving, e.g. by a full disk, or damaged)"
    return None


def _file_problem(path: str) -> Optional[str]:
    """Why a checkpoint file is not whole, from its size and framing only (no tensor is read): a torch file
    (``.pt``/``.pth``/``.bin``: a zip archive) lacks its closing directory, a safetensors file is shorter than its
    header says, a JSON file does not parse. ``None`` for whole files and for files of other kinds."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        return None
    try:
        if name.endswith((".pt", ".pth", ".bin")):
            return None if zipfile.is_zipfile(path) else "is not a complete torch file"
        if name.endswith(".safetensors"):
            size = os.path.getsize(path)
            with open(path, "rb") as handle:
                head = handle.read(8)
                length = int.from_bytes(head, "little") if len(head) == 8 else -1
                if length < 0 or 8 + length > size:
                    return "has a cut-off safetensors header"
                header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
            return None if size >= 8 + length + end else f"is {size} bytes, shorter than its header says ({8 + length + end})"
        if name.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        return f"cannot be read ({type(error).__name__}: {error})"
    return None


def checkpoints_newest_first(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


def latest_complete_checkpoint(output_dir: str) -> tuple[Optional[str], list[tuple[str, str]]]:
    """The newest complete checkpoint in ``output_dir`` and the newer ones skipped, with the reason."""
    skipped = []
    for path in checkpoints_newest_first(output_dir):
        reason = incomplete_reason(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


# Fields added to the fingerprint after checkpoints without them were written: a checkpoint that predates one is
# not compared on it (it could not record it), every newer checkpoint is.
_LATER_FIELDS = frozenset({"teacher_inputs"})


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences, one per top-level field."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key in _LATER_FIELDS and key not in saved:
            continue
        if saved.get(key) != current.get(key):
            differences.append(f"{key}: checkpoint {saved.get(key)!r} vs this run {current.get(key)!r}")
    return differences


def resolve_resume(resume_from_checkpoint, output_dir: str, current: dict[str, Any]) -> Optional[str]:
    """The checkpoint to resume (``None``: start afresh). ``True`` resolves to the newest COMPLETE checkpoint in
    ``output_dir`` (newer cut-off ones are skipped with a warning); a checkpoint of another run (its fingerprint
    differs from ``current``) is refused."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        path, skipped = latest_complete_checkpoint(output_dir)
        for bad, reason in skipped:
            logger.warning(f"Not resuming from {bad}: {reason}.")
        if path is None:
            raise ValueError(
                f"No complete checkpoint to resume in output_dir {output_dir!r}"
                + (f" ({len(skipped)} incomplete skipped)." if skipped else ".")
            )
        if skipped:
            logger.warning(f"Resuming from the previous complete checkpoint {path}.")
    else:
        path = str(resume_from_checkpoint)
        reason = incomplete_reason(path)
        if reason is not None:
            raise ValueError(f"Cannot resume from {path}: {reason}.")
    differences = fingerprint_differences(read_fingerprint(path), current)
    if differences:
        raise CheckpointMismatchError(
            f"Checkpoint {path} belongs to another run; resuming it would continue that run: "
            + "; ".join(differences)
            + ". Use another output_dir, or resume the run it belongs to."
        )
    return path


def saved_max_steps(checkpoint_dir: str) -> Optional[int]:
    """The ``max_steps`` of the run that wrote ``checkpoint_dir`` (from its ``trainer_state.json``)."""
    try:
        with open(os.path.join(checkpoint_dir, TRAINER_STATE_FILE), encoding="utf-8") as handle:
            return int(json.load(handle).get("max_steps"))
    except (OSError, ValueError, TypeError):
        return None


class ResumeGuard(TrainerCallback):
    """Refuse a resume that would train 0 steps and hand back another (longer) run's model.

    ``checkpoint`` is the checkpoint being resumed (set by the trainer): when it is THIS run's own final
    checkpoint (same fingerprint, same ``max_steps``), the run has simply finished, and resuming it returns
    its model with a warning instead of an error.
    """

    checkpoint: Optional[str] = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.max_steps > 0 and state.global_step >= state.max_steps:
            if self.checkpoint is not None and saved_max_steps(self.checkpoint) == state.max_steps:
                logger.warning(
                    f"{self.checkpoint} is this run's final checkpoint (step {state.global_step} of {state.max_steps}): "
                    "the run has finished, nothing is trained, and train() returns its model."
                )
                return
            raise ValueError(
                f"The checkpoint being resumed is at step {state.global_step}, but this run ends at step "
                f"{state.max_steps}: nothing would be trained and train() would return the checkpoint's model. It "
                "belongs to a longer run; use another output_dir or a larger max_steps/num_train_epochs."
            )
