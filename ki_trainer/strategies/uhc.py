"""UHC (Vongkulbhisal et al., 2019, "Unifying Heterogeneous Classifiers").

For each teacher, the student's distribution is renormalised inside that teacher's classes and
matched to the teacher there; the per-teacher divergences are summed. No teacher has to be
calibrated against another, but every teacher's opinion counts on every example, including the
out-of-domain ones.
"""

from __future__ import annotations

import torch

from ..numerics import kl_from_log_probs
from .base import IntegrationOutput, IntegrationStrategy, TeacherSignals, register_strategy


@register_strategy
class UHC(IntegrationStrategy):
    name = "uhc"

    def compute(self, student_logits: torch.Tensor, signals: TeacherSignals) -> IntegrationOutput:
        tau = self.options.temperature
        student = student_logits.float() / tau
        divergence = student.new_zeros(student.shape[0])
        for t, logits in enumerate(signals.logits):
            index = self.label_space.teacher_to_union(t).to(student.device)
            log_probs = torch.log_softmax(student.index_select(1, index), dim=-1)
            target = torch.softmax(logits.float() / tau, dim=-1)
            divergence = divergence + kl_from_log_probs(target, log_probs)
        divergence = divergence * tau**2
        return IntegrationOutput(loss=divergence.mean(), divergence=divergence)
