"""A typical Hugging Face text-classification script (HfArgumentParser + Trainer), kept as the user wrote it.

tests/scripts/hf_text_classification_ki.py is the same script converted to knowledge integration; the
diff between the two files is what a user changes (tests/trainer/test_converted_script.py checks it stays small).
"""

import sys
from dataclasses import dataclass, field

import numpy as np
from datasets import ClassLabel, load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "Student checkpoint."})
    train_file: str = field(metadata={"help": "JSON lines with text (and label) columns."})
    validation_file: str = field(metadata={"help": "JSON lines with text and label columns."})
    max_seq_length: int = field(default=32)


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    raw = load_dataset("json", data_files={"train": script_args.train_file, "validation": script_args.validation_file})
    label_list = sorted(set(raw["validation"]["label"]))
    raw = raw.cast_column("label", ClassLabel(names=label_list))

    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        script_args.model_name_or_path,
        num_labels=len(label_list),
        id2label=dict(enumerate(label_list)),
        label2id={label: i for i, label in enumerate(label_list)},
        ignore_mismatched_sizes=True,
    )

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=script_args.max_seq_length)

    data = raw.map(tokenize, batched=True).rename_column("label", "labels")

    def compute_metrics(eval_pred):
        predictions = np.argmax(eval_pred.predictions, axis=-1)
        return {"accuracy": float((predictions == eval_pred.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    predictions = trainer.predict(data["validation"]).predictions.argmax(-1)
    trainer.save_model()
    return [label_list[i] for i in predictions]


if __name__ == "__main__":
    print(main(sys.argv[1:])[:10])
