"""Cross-lingual knowledge integration: teachers that read DIFFERENT languages, one multilingual student.

Teacher A is an English model fine-tuned on one half of the Debian sections (English descriptions);
teacher B is a multilingual model fine-tuned on the other half using only ITALIAN descriptions
(--other_language). Each reads the unlabeled text with its own tokenizer; the multilingual-e5-small
student learns all 20 sections from both, and is evaluated per language on the test rows.

    HF_HUB_OFFLINE=1 python examples/cross_lingual.py --output_dir outputs/cross_lingual \
        --max_train_per_class 60 --max_length 64 --epochs 2

Unlabeled training text is the union of both languages' train rows (ids suffixed by language so
cached signals stay unique). Teachers are cached in <output_dir>/teachers_<lang>/ like
examples/train_teachers.py does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datasets import concatenate_datasets

sys.path.insert(0, str(Path(__file__).parent))
import train_teachers  # noqa: E402  (the teacher-training example, reused)

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher  # noqa: E402
from ki_trainer.data import cap_per_class, load_debian_sections  # noqa: E402
from ki_trainer.pretrained import resolve_model  # noqa: E402


def train_language_teachers(out: Path, model: str, language: str, args: argparse.Namespace) -> list[str]:
    """Teachers for the 2x10 split trained on ``language`` text; returns the teacher directories."""
    argv = [
        "--model_name_or_path", model, "--language", language, "--split_spec", "2x10",
        "--max_train_per_class", str(args.max_train_per_class), "--max_length", str(args.max_length),
        "--num_train_epochs", str(args.epochs), "--learning_rate", "1e-4", "--per_device_train_batch_size", "16",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--seed", "0",
        "--output_dir", str(out / f"teachers_{language}"),
    ]
    summary = train_teachers.main(argv)
    return [str(out / f"teachers_{language}" / record["path"]) for record in summary["teachers"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/cross_lingual")
    parser.add_argument("--english_model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--multilingual_model", default="intfloat/multilingual-e5-small")
    parser.add_argument("--other_language", default="it", help="DDTP language of teacher B (it has the widest coverage)")
    parser.add_argument("--max_train_per_class", type=int, default=60)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--strategy", default="muki")
    parser.add_argument("--mc_samples", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.output_dir)
    other = args.other_language

    english_teachers = train_language_teachers(out, args.english_model, "en", args)
    other_teachers = train_language_teachers(out, args.multilingual_model, other, args)
    teachers = [
        Teacher(english_teachers[0], tokenizer=english_teachers[0], name="en_teacher"),
        Teacher(other_teachers[1], tokenizer=other_teachers[1], name=f"{other}_teacher"),
    ]

    splits = {lang: load_debian_sections(language=lang) for lang in ("en", other)}
    unlabeled = concatenate_datasets([
        cap_per_class(splits[lang]["train"], args.max_train_per_class, seed=0).map(
            lambda row, lang=lang: {"id": f"{row['id']}/{lang}"}
        ).remove_columns("label")
        for lang in ("en", other)
    ])
    config = KnowledgeIntegrationConfig(
        output_dir=str(out / f"student_{args.strategy}"), strategy=args.strategy, mc_samples=args.mc_samples,
        signal_source="cached", max_length=args.max_length, num_train_epochs=args.epochs,
        per_device_train_batch_size=16, per_device_eval_batch_size=32, learning_rate=1e-4, report_to=[],
        save_strategy="no", use_cpu=True, seed=0,
    )
    trainer = KnowledgeIntegrationTrainer(
        model=str(resolve_model(args.multilingual_model)), args=config, teachers=teachers, train_dataset=unlabeled
    )
    trainer.train()
    results = {lang: trainer.evaluate(splits[lang]["test"], metric_key_prefix=f"test_{lang}") for lang in ("en", other)}
    (out / f"results_{args.strategy}.json").write_text(json.dumps(results, indent=2) + "\n")
    for lang, metrics in results.items():
        print(f"{lang}: accuracy {metrics[f'test_{lang}_accuracy']:.3f}  macro-F1 {metrics[f'test_{lang}_macro_f1']:.3f}  "
              f"routing {metrics.get(f'test_{lang}_teacher_selection_accuracy', float('nan')):.3f}")


if __name__ == "__main__":
    main()
