"""Merge an English and a multilingual masked LM into one small multilingual student (MergeDistill).

The teachers must be masked LMs with trained heads. The benchmark trains two from the real models
(``python benchmarks/merge_distill.py --config cpu`` leaves them in outputs/merge_distill/cpu/teachers);
any ``*ForMaskedLM`` directory or Hub id works (e.g. bert-base-uncased, xlm-roberta-base online).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python examples/merge_distill.py

The same job from the console: ``ki-trainer merge-distill`` (see docs/cli.md); this script calls the
command's own ``run`` with Python objects.
"""

import argparse

from transformers import pipeline

from ki_trainer import MergeDistillConfig
from ki_trainer.cli.merge_distill import MergeDistillArguments, run

parser = argparse.ArgumentParser()
parser.add_argument("--english", default="outputs/merge_distill/cpu/teachers/all-MiniLM-L6-v2")
parser.add_argument("--multilingual", default="outputs/merge_distill/cpu/teachers/multilingual-e5-small")
parser.add_argument("--rows", type=int, default=300, help="texts per language")
cli = parser.parse_args()

script_args = MergeDistillArguments(
    teachers=[{"path": cli.english, "languages": ["en"], "name": "english"},
              {"path": cli.multilingual, "languages": ["it"], "name": "multilingual"}],
    # Unlabeled text per language: Debian package descriptions and their translations (the first rows of each).
    train_files=["/work/shared/data/debian_ddtp.jsonl.xz"], ddtp_sources="all", max_rows_per_language=cli.rows,
    # Student vocabulary: the union of the teachers' vocabularies, kept to tokens that occur twice in the text.
    vocabulary_min_count=2,
    student_hidden_size=384, student_num_hidden_layers=2, student_num_attention_heads=6,
)
args = MergeDistillConfig(output_dir="outputs/merge_distill_example", alpha=0.5, top_k=8, max_length=48,
                          signal_source="cached", teacher_output="student_vocabulary", num_train_epochs=1,
                          per_device_train_batch_size=32, learning_rate=5e-4, report_to="none", save_strategy="no")
summary = run(script_args, args)  # saves a plain BertForMaskedLM + PreTrainedTokenizerFast and a model card
print(summary["student_vocabulary_size"], "student tokens;", summary["coverage"])

fill = pipeline("fill-mask", model="outputs/merge_distill_example")
print(fill(f"a tool to edit {fill.tokenizer.mask_token} files"))
