"""The "Knowledge integration" section of a merged student's model card.

A merged student is only trustworthy with its provenance: which teachers it was distilled from,
which labels each contributed, how their predictions were integrated. ``push_to_hub`` and
``create_model_card`` append this section to the Trainer's own card.
"""

from __future__ import annotations

from typing import Sequence

from .config import KnowledgeIntegrationConfig
from .teacher import Teacher

MODEL_CARD_TAGS = ["knowledge-integration", "ki-trainer", "text-classification"]


def integration_section(teachers: Sequence[Teacher], args: KnowledgeIntegrationConfig) -> str:
    lines = [
        "## Knowledge integration",
        "",
        "This student was trained **without gold labels** with [ki-trainer](https://github.com/ki-trainer/ki-trainer): "
        "it learned from the predictions of the teachers below on unlabeled text, over the union of their labels.",
        "",
        "| teacher | source | labels |",
        "|---|---|---|",
    ]
    for teacher in teachers:
        lines.append(f"| {teacher.name} | {teacher.source or type(teacher.model).__name__} | {', '.join(teacher.labels)} |")
    settings = {
        "strategy": args.strategy,
        "selection": args.selection,
        "mc_samples": args.mc_samples,
        "mc_top_layers": args.mc_top_layers,
        "kd_temperature": args.kd_temperature,
        "teacher_score_temperature": args.teacher_score_temperature,
        "margin_reweighting": args.margin_reweighting,
        "normalize_margin_weights": args.normalize_margin_weights,
        "certainty_normalization": args.certainty_normalization,
        "teacher_signals": args.teacher_signals,
    }
    lines += ["", "Integration settings:", ""] + [f"- `{k}`: {v}" for k, v in settings.items()]
    lines += [
        "",
        "Gold labels, where the evaluation data had them, were used for evaluation only. Classes the teachers "
        "disagree on or never saw are where a merged student is weakest: check the per-teacher accuracies above.",
        "",
    ]
    return "\n".join(lines)
