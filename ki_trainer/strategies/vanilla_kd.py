"""Vanilla KD: one softmax over all teachers' concatenated logits.

The baseline of the knowledge-amalgamation literature. It assumes the teachers' logits are on
comparable scales, which is exactly what breaks when they are not. A class owned by several
teachers receives the sum of the mass of its copies.
"""

from __future__ import annotations

import torch

from ..numerics import kl_from_log_probs
from .base import IntegrationOutput, IntegrationStrategy, TeacherSignals, register_strategy


@register_strategy
class VanillaKD(IntegrationStrategy):
    name = "vanilla_kd"

    def compute(self, student_logits: torch.Tensor, signals: TeacherSignals) -> IntegrationOutput:
        tau = self.options.temperature
        concatenated = torch.cat([logits.float() for logits in signals.logits], dim=-1)
        probs = torch.softmax(concatenated / tau, dim=-1)
        index = torch.cat([self.label_space.teacher_to_union(t) for t in range(len(signals.logits))])
        target = probs.new_zeros(probs.shape[0], self.label_space.num_labels)
        target.index_add_(1, index.to(probs.device), probs)
        log_probs = torch.log_softmax(student_logits.float() / tau, dim=-1)
        divergence = kl_from_log_probs(target, log_probs) * tau**2
        return IntegrationOutput(loss=divergence.mean(), divergence=divergence, target=target)
