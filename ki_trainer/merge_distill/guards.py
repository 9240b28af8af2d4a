"""The integrate path's run guards for :class:`~ki_trainer.merge_distill.MergeDistillTrainer`.

* Every checkpoint records what run it belongs to (``ki_fingerprint.json``: the teachers' names, languages,
  weight hashes, truncation lengths and tokenizations, the student vocabulary, the distillation settings); a
  resume of another run's checkpoint is a :class:`~ki_trainer.checkpoints.CheckpointMismatchError` listing what
  differs.
* ``resume_from_checkpoint=True`` takes the newest COMPLETE checkpoint (a newer one cut off mid-save is skipped
  with a warning); a longer run's checkpoint, which would train nothing, is refused.
* One run at a time writes an ``output_dir`` (:func:`~ki_trainer.launch.output_dir_lock`).
* A NaN/inf training loss stops training at the next logging step, before any checkpoint or save and at the end
  (:class:`~ki_trainer.guards.FiniteLossGuard`: one flag on the device, no host sync per step): never a NaN
  student logged with loss 0 and saved.

The same machinery as :mod:`ki_trainer.checkpoints` uses for knowledge integration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

from .. import checkpoints
from ..collator import tokenizer_fingerprint
from ..guards import FiniteLossGuard
from ..launch import output_dir_lock

# The settings that make two MergeDistill runs different runs (the optimiser's are the Trainer's business).
RUN_SETTINGS = ("alpha", "kd_temperature", "top_k", "teacher_output", "mlm_probability", "static_masking",
                "max_length", "teacher_signals", "output_vocabulary")
# Settings recorded under an earlier field name, so that checkpoints written before the rename still match.
_SETTING_FIELDS = {"teacher_signals": "signal_source"}


class RunGuards:
    """Mixin placed before ``transformers.Trainer``: fingerprinted checkpoints, checked resumes, an output_dir lock."""

    _teacher_digests: Optional[list[str]] = None
    _resume_guard: Optional[checkpoints.ResumeGuard] = None

    def run_fingerprint(self) -> dict[str, Any]:
        """What identifies this MergeDistill run in its checkpoints. Teacher weights are hashed once."""
        if self._teacher_digests is None:
            self._teacher_digests = [checkpoints.weights_digest(t.model) for t in self.teachers]
        fields = {f.name for f in dataclasses.fields(self.args)}
        tokens = json.dumps(list(getattr(self.vocabulary, "tokens", []) or []), ensure_ascii=False).encode()
        return {
            "teachers": [{"name": t.name, "languages": list(getattr(t, "languages", []) or []), "weights": digest,
                          "max_length": t.max_length,
                          "tokenization": tokenizer_fingerprint(t.tokenizer) if t.tokenizer is not None else None}
                         for t, digest in zip(self.teachers, self._teacher_digests)],
            "language_teachers": dict(getattr(self, "language_teachers", {}) or {}),
            "student_vocabulary": hashlib.sha256(tokens).hexdigest()[:20],
            "settings": {name: getattr(self.args, _SETTING_FIELDS.get(name, name)) for name in RUN_SETTINGS
                         if _SETTING_FIELDS.get(name, name) in fields},
        }

    _finite_loss: Optional[FiniteLossGuard] = None

    def _loss_guard(self) -> FiniteLossGuard:
        if self._finite_loss is None:
            self._finite_loss = FiniteLossGuard(self.accelerator.device, what="MergeDistill")
        return self._finite_loss

    def _check_finite_loss(self, when: str, collective: bool = True) -> None:
        step = self.state.global_step if getattr(self, "state", None) is not None else 0
        self._loss_guard().check(self.accelerator, step, when, collective)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self._loss_guard().record(loss)  # no host sync here
        return loss

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        self._check_finite_loss("at a logging step")  # before the Trainer logs a NaN loss as 0
        super().log(logs, start_time)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        self._check_finite_loss("before saving the model", collective=False)
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        self._check_finite_loss("before saving a checkpoint")
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            checkpoints.write_fingerprint(folder, self.run_fingerprint())  # first: trainer_state.json marks "complete"
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        path = None
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:  # teacher weights hashed only then
            path = checkpoints.resolve_resume(resume_from_checkpoint, self.args.output_dir, self.run_fingerprint())
        if self._resume_guard is None:
            self._resume_guard = checkpoints.ResumeGuard()
            self.add_callback(self._resume_guard)
        self._resume_guard.checkpoint = path
        # A second run writing the same output_dir while this one is alive is refused.
        with output_dir_lock(self.args.output_dir, is_main_process=self.is_world_process_zero()):
            output = super().train(path, *args, **kwargs)
        self._check_finite_loss("at the end of training")
        return output
