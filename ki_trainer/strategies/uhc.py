"""UHC (Vongkulbhisal et al., 2019, "Unifying Heterogeneous Classifiers").

For each teacher, the student's distribution is renormalised inside that teacher's classes and
matched to the teacher there; the per-teacher divergences are summed. No teacher has to be
calibrated against another, but every teacher's opinion counts on every example, including the
out-of-domain ones.
"""

from __future__ import annotations

import torch

from ..numerics import kl_from_log_probs
from ..label_space import LabelSpace
from .base import IntegrationOutput, IntegrationStrategy, TeacherSignals, register_strategy


def within_teacher_divergence(student_logits: torch.Tensor, teacher_logits: list[torch.Tensor],
                              label_space: LabelSpace, temperature: float = 1.0) -> torch.Tensor:
    """``[B]``: for each teacher, KL(teacher || student renormalised inside that teacher's classes), summed over the
    teachers and scaled by ``temperature**2``. It teaches how each teacher ranks its own classes on every row, and
    nothing about which teacher's classes the row belongs to."""
    student = student_logits.float() / temperature
    divergence = student.new_zeros(student.shape[0])
    for t, logits in enumerate(teacher_logits):
        index = label_space.teacher_to_union(t).to(student.device)
        log_probs = torch.log_softmax(student.index_select(1, index), dim=-1)
        target = torch.softmax(logits.float().to(student.device) / temperature, dim=-1)
        divergence = divergence + kl_from_log_probs(target, log_probs)
    return divergence * temperature**2


@register_strategy
class UHC(IntegrationStrategy):
    name = "uhc"

    def compute(self, student_logits: torch.Tensor, signals: TeacherSignals) -> IntegrationOutput:
        divergence = within_teacher_divergence(student_logits, signals.logits, self.label_space,
                                               self.options.temperature)
        return IntegrationOutput(loss=divergence.mean(), divergence=divergence)
