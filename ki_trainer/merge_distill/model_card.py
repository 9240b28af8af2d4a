"""The model card of a merged student: teachers and their languages, vocabulary and coverage, how the
saved tokenizer reads each language compared with training, settings, results, a fill-mask snippet
that runs, and citations. It replaces transformers' default fine-tuning card."""

from __future__ import annotations

import json
from typing import Optional, Sequence

MERGE_DISTILL_TAGS = ["merge-distill", "ki-trainer", "fill-mask"]

CITATIONS = """```bibtex
@inproceedings{khanuja-etal-2021-mergedistill,
  title     = {MergeDistill: Merging Language Models using Pre-trained Distillation},
  author    = {Khanuja, Simran and Johnson, Melvin and Talukdar, Partha},
  booktitle = {Findings of the Association for Computational Linguistics: ACL-IJCNLP 2021},
  year      = {2021},
  pages     = {2874--2887}
}
@article{hinton2015distilling,
  title   = {Distilling the Knowledge in a Neural Network},
  author  = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal = {arXiv preprint arXiv:1503.02531},
  year    = {2015}
}
@article{sanh2019distilbert,
  title   = {DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter},
  author  = {Sanh, Victor and Debut, Lysandre and Chaumond, Julien and Wolf, Thomas},
  journal = {arXiv preprint arXiv:1910.01108},
  year    = {2019}
}
```"""


def fill_mask_snippet(model_id: str, mask_token: str, example: str = "Debian is a free operating {mask}.") -> str:
    """A fill-mask usage snippet for the card (``model_id``: the Hub id or the local directory)."""
    return (
        "```python\n"
        "from transformers import pipeline\n\n"
        f"fill = pipeline(\"fill-mask\", model={json.dumps(model_id)})\n"
        f"for guess in fill({json.dumps(example.format(mask=mask_token))}, top_k=3):\n"
        "    print(guess[\"token_str\"], round(guess[\"score\"], 3))\n"
        "```"
    )


def merge_distill_section(teachers: Sequence, language_teachers: dict, vocabulary, args,
                          segmentation: Optional[dict] = None, output_tokens: Optional[int] = None) -> str:
    """Teachers, vocabulary/coverage, segmentation agreement and settings (markdown)."""
    lines = [
        "## How it was made (MergeDistill)",
        "",
        "This student masked LM was distilled task-agnostically from the masked-LM teachers below with "
        "[ki-trainer](https://github.com/ki-trainer/ki-trainer) (MergeDistill, this project's design after "
        "Khanuja et al., 2021). Every text was read by the STUDENT's tokenizer (the one saved with this model) and "
        "masked there; the teacher of the text's language read the same text in its own tokenization, and at the "
        "masked positions whose characters are exactly one teacher token the student learned from that teacher's "
        "top-k predictions (written in the student's tokens); every masked position also learned the masked token.",
        "",
        "| teacher | source | languages | teacher vocabulary | teacher tokens with a student token | token occurrences covered (training text) |",
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
    tokenizer = vocabulary.tokenizer
    lines += [
        "",
        "### Vocabulary and tokenizer",
        "",
        f"- tokenizer: `{type(tokenizer).__name__}` (`{getattr(tokenizer, 'name_or_path', '') or 'built from the teachers'}`), "
        f"{len(vocabulary)} tokens; it is the tokenizer the student was trained with, unchanged.",
    ]
    if output_tokens is not None:
        lines.append(f"- the output layer predicts among the {output_tokens} tokens that occur in the training text "
                     "(the output bias of every other token is -100); segmentation is not affected.")
    if segmentation:
        lines += ["", "Segmentation agreement of the SAVED tokenizer with the training tokenizer (training text; "
                  "[UNK] words: words this tokenizer reads as [UNK] where the language's teacher does not):", "",
                  "| language | words | segmented as in training | [UNK] words |", "|---|---|---|---|"]
        for language, report in segmentation.items():
            lines.append(f"| {language or '-'} | {report['words']} | {report['same_segmentation']:.2%} | {report['unknown_words']} |")
    settings = {
        "alpha (KD weight)": args.alpha,
        "top_k": args.top_k,
        "kd_temperature": args.kd_temperature,
        "mlm_probability": args.mlm_probability,
        "signal_source": args.signal_source,
        "teacher_output": args.teacher_output,
        "output_vocabulary": getattr(args, "output_vocabulary", "full"),
        "freeze_word_embeddings": getattr(args, "freeze_word_embeddings", False),
        "epochs": args.num_train_epochs,
        "learning_rate": args.learning_rate,
    }
    lines += ["", "### Training settings", ""] + [f"- {k}: `{v}`" for k, v in settings.items()]
    lines += ["", "Languages without a teacher above were not distilled.", ""]
    return "\n".join(lines)


def student_card(teachers: Sequence, language_teachers: dict, vocabulary, args, *, model_id: str,
                 segmentation: Optional[dict] = None, output_tokens: Optional[int] = None,
                 results: Optional[str] = None, init: Optional[dict] = None) -> str:
    """The whole README.md of a merged student (YAML metadata, summary, usage, details, results, citations)."""
    languages = sorted(language_teachers)
    meta = ["---", "library_name: transformers", "pipeline_tag: fill-mask", "language:"]
    meta += [f"- {lang}" for lang in languages]
    meta += ["tags:"] + [f"- {tag}" for tag in MERGE_DISTILL_TAGS] + ["---", ""]
    teachers_line = "; ".join(
        f"{t.name} ({', '.join(sorted(lang for lang, name in language_teachers.items() if name == t.name)) or '-'})"
        for t in teachers
    )
    start = ""
    if init:
        if init.get("init") == "teacher":
            start = (f" It was started from {init.get('teacher')} (layers {init.get('layers')} of {init.get('of')}) and "
                     "then distilled.")
        else:
            start = " It was started from a fresh encoder with teacher-initialised word embeddings."
    body = [
        f"# {model_id.rstrip('/').split('/')[-1]}",
        "",
        f"One masked language model for {', '.join(languages)}, merged from: {teachers_line}.{start}",
        "",
        "## Usage",
        "",
        fill_mask_snippet(model_id, vocabulary.tokenizer.mask_token),
        "",
        merge_distill_section(teachers, language_teachers, vocabulary, args, segmentation, output_tokens),
    ]
    if results:
        body += ["## Results", "", results.strip(), ""]
    body += ["## Citations", "", CITATIONS, ""]
    return "\n".join(meta + body)


def add_results_to_card(directory: str, results: str, heading: str = "## Results") -> str:
    """Put ``results`` (markdown) into ``<directory>/README.md`` under ``heading`` (replacing an earlier
    section of that heading), before the citations. Returns the card's new text."""
    import os
    import re

    path = os.path.join(directory, "README.md")
    with open(path, encoding="utf-8") as handle:
        card = handle.read()
    section = f"{heading}\n\n{results.strip()}\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(card):
        card = pattern.sub(lambda _: section, card, count=1)
    elif "## Citations" in card:
        card = card.replace("## Citations", section + "## Citations", 1)
    else:
        card = card.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(card)
    return card
