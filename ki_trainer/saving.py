"""Saving: checkpoints that record their run (and refuse another run's), the final model (a PEFT adapter with its
labels, or merged), a transductive router's fitted state beside it, and the model card.

:class:`SavingMixin` holds these ``Trainer`` overrides of :class:`~ki_trainer.trainer.KnowledgeIntegrationTrainer`
(which also defines ``router``, ``label_space``, ``teachers`` and the finite-loss guard they read).
"""

from __future__ import annotations

import os
from typing import Optional

from . import checkpoints
from .model_card import write_model_card
from .peft_support import is_peft_model, merged_copy, unwrap, write_labels
from .routing.fitting import save_router_state


class SavingMixin:
    # ------------------------------------------------------------------ checkpoints and resuming
    def run_fingerprint(self) -> dict:
        """What identifies this run in its checkpoints (see :func:`ki_trainer.checkpoints.run_fingerprint`)."""
        return checkpoints.run_fingerprint(self)

    def _checked_resume(self, resume_from_checkpoint):
        """Resolve ``True`` to the newest COMPLETE checkpoint and refuse a checkpoint of another run."""
        path = checkpoints.resolve_resume(resume_from_checkpoint, self.args.output_dir, self.run_fingerprint())
        self._resume_guard.checkpoint = path  # a finished run's own final checkpoint is not "a longer run's"
        return path

    def _save_checkpoint(self, model, trial) -> None:
        self._check_finite_loss("before saving a checkpoint")
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            checkpoints.write_fingerprint(folder, self.run_fingerprint())  # first: trainer_state.json marks "complete"
        super()._save_checkpoint(model, trial)

    def _check_finite_loss(self, when: str, collective: bool = True) -> None:
        """Raise if any training step since training began had a NaN/inf loss (one host sync)."""
        step = self.state.global_step if getattr(self, "state", None) is not None else 0
        self._finite_loss.check(self.accelerator, step, when, collective)

    # ------------------------------------------------------------------ the final model and its card
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Save the student (a PEFT adapter with its labels, or merged with ``merge_adapter``) and, for a
        final save, its model card (``README.md``)."""
        self._check_finite_loss("before saving the model", collective=False)  # users may call it on one rank
        self._final_save = not _internal_call or self._pushing
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._final_save = False
        if not _internal_call and self.is_world_process_zero():
            self.write_model_card(output_dir or self.args.output_dir)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_router_state(self.router, output_dir)  # a transductive router's fit travels with the model and checkpoints
        peft_student = is_peft_model(self.accelerator.unwrap_model(self.model))
        if peft_student and self.args.merge_adapter and self._final_save:
            original = self.model
            self.model = merged_copy(self.accelerator.unwrap_model(original))  # training keeps the adapter
            try:
                super()._save(output_dir, state_dict=None)
            finally:
                self.model = original
            return
        super()._save(output_dir, state_dict)
        if peft_student:
            write_labels(output_dir, unwrap(self.accelerator.unwrap_model(self.model)).config)

    def push_to_hub(self, *args, **kwargs):
        self._pushing = True  # push_to_hub saves with _internal_call=True: still the final model
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self._pushing = False

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
        """The card from the packaged template (see :mod:`ki_trainer.model_card`), in ``output_dir``."""
        if not self.is_world_process_zero():
            return
        self.write_model_card(
            self.args.output_dir, language=language, license=license, tags=tags, model_name=model_name,
            finetuned_from=finetuned_from, dataset=dataset,
        )

    def write_model_card(self, output_dir: str, **kwargs) -> str:
        """Render the model card into ``<output_dir>/README.md`` and return its path."""
        return write_model_card(self, output_dir, **kwargs)
