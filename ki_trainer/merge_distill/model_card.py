"""The "MergeDistill" section of a merged student's model card: teachers, languages, vocabulary, coverage."""

from __future__ import annotations

from typing import Sequence

MERGE_DISTILL_TAGS = ["merge-distill", "ki-trainer", "fill-mask"]


def merge_distill_section(teachers: Sequence, language_teachers: dict, vocabulary, args) -> str:
    lines = [
        "## MergeDistill",
        "",
        "This student masked LM was distilled task-agnostically from the masked-LM teachers below with "
        "[ki-trainer](https://github.com/ki-trainer/ki-trainer) (MergeDistill): each text was tokenized and masked "
        "by the teacher of its language, and the student learned from that teacher's top-k predictions at the "
        "masked positions and from the masked tokens themselves.",
        "",
        "| teacher | source | languages | vocabulary | student vocabulary share | token occurrences covered (training text) |",
        "|---|---|---|---|---|---|",
    ]
    coverage = {c.teacher: c for c in vocabulary.coverage}
    for teacher in teachers:
        languages = sorted(lang for lang, name in language_teachers.items() if name == teacher.name)
        report = coverage.get(teacher.name)
        share = f"{report.vocab_mapped}/{report.vocab_size} ({report.vocab_share:.1%})" if report else "-"
        occ = f"{report.occurrence_share:.2%}" if report and report.occurrence_share is not None else "not measured"
        lines.append(
            f"| {teacher.name} | {teacher.source or type(teacher.model).__name__} | {', '.join(languages) or '-'} | "
            f"{len(teacher.tokenizer)} | {share} | {occ} |"
        )
    settings = {
        "student vocabulary size": len(vocabulary),
        "alpha (KD weight)": args.alpha,
        "top_k": args.top_k,
        "kd_temperature": args.kd_temperature,
        "mlm_probability": args.mlm_probability,
        "teacher_signals": args.teacher_signals,
        "teacher_output": args.teacher_output,
    }
    lines += ["", "Settings:", ""] + [f"- {k}: `{v}`" for k, v in settings.items()]
    lines += [
        "",
        "The saved tokenizer segments text by greedy longest match over the union vocabulary; during training each "
        "language was segmented by its teacher's tokenizer. Languages without a teacher above were not distilled.",
        "",
    ]
    return "\n".join(lines)
