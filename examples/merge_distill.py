"""Merge an English and a multilingual masked LM into one small multilingual student (MergeDistill).

The teachers must be masked LMs with trained heads. The benchmark trains two from the real models
(``python benchmarks/merge_distill.py --config cpu`` leaves them in outputs/merge_distill/cpu/teachers);
any ``*ForMaskedLM`` directory or Hub id works (e.g. bert-base-uncased, xlm-roberta-base online).

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python examples/merge_distill.py
"""

import argparse
import json
import lzma

from datasets import Dataset
from transformers import pipeline

from ki_trainer import MaskedLMTeacher, MergeDistillConfig, MergeDistillTrainer, StudentVocabulary, build_student
from ki_trainer.merge_distill import count_tokens

parser = argparse.ArgumentParser()
parser.add_argument("--english", default="outputs/merge_distill/cpu/teachers/all-MiniLM-L6-v2")
parser.add_argument("--multilingual", default="outputs/merge_distill/cpu/teachers/multilingual-e5-small")
parser.add_argument("--rows", type=int, default=300, help="texts per language")
cli = parser.parse_args()

# Unlabeled text per language (Debian package descriptions and their translations).
texts = {"en": [], "it": []}
with lzma.open("/work/shared/data/debian_ddtp.jsonl.xz", "rt") as f:
    for line in f:
        row = json.loads(line)
        if row["lang"] in texts and len(texts[row["lang"]]) < cli.rows:
            texts[row["lang"]].append({"id": f"{row['lang']}:{row['package']}", "text": row["text"], "language": row["lang"]})
train = Dataset.from_list(texts["en"] + texts["it"]).shuffle(seed=0)

teachers = [MaskedLMTeacher(cli.english, languages=["en"], name="english"),
            MaskedLMTeacher(cli.multilingual, languages=["it"], name="multilingual")]
# Student vocabulary: the union of the teachers' vocabularies, kept to tokens that occur twice in the text.
counts = [count_tokens(t.tokenizer, [r["text"] for r in texts[t.languages[0]]], 48) for t in teachers]
vocabulary = StudentVocabulary.union([t.tokenizer for t in teachers], [t.name for t in teachers], counts, min_count=2)
print(len(vocabulary), "student tokens;", vocabulary.coverage_table())

student = build_student(vocabulary, teachers, hidden_size=384, num_hidden_layers=2, num_attention_heads=6)
args = MergeDistillConfig(output_dir="outputs/merge_distill_example", alpha=0.5, top_k=8, max_length=48,
                          teacher_signals="cached", teacher_output="student_vocabulary", num_train_epochs=1,
                          per_device_train_batch_size=32, learning_rate=5e-4, report_to="none", save_strategy="no")
trainer = MergeDistillTrainer(model=student, args=args, teachers=teachers, vocabulary=vocabulary, train_dataset=train)
trainer.train()
trainer.save_model()  # a plain BertForMaskedLM + PreTrainedTokenizerFast
trainer.create_model_card()

fill = pipeline("fill-mask", model="outputs/merge_distill_example")
print(fill(f"a tool to edit {fill.tokenizer.mask_token} files"))
