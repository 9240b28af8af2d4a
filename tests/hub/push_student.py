"""Run in a subprocess with HF_ENDPOINT pointing at the stub hub (it must be set before import)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import TEACHER_SPLIT, build_tokenizer, make_rows, tiny_bert  # noqa: E402
from datasets import Dataset  # noqa: E402

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher  # noqa: E402

out = sys.argv[1]
tok = build_tokenizer()
teachers = [Teacher(tiny_bert(2, len(tok), labels=l, seed=i), name=f"t{i}", language=lang)
            for i, (l, lang) in enumerate(zip(TEACHER_SPLIT, ["en", "it"]))]
args = KnowledgeIntegrationConfig(
    output_dir=out, max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
    push_to_hub=True, hub_model_id="me/merged-student", hub_token="hf_test_token", mc_samples=2,
)
data = Dataset.from_list([{"text": r["text"]} for r in make_rows(2, seed=0)])
trainer = KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok)), args=args, teachers=teachers,
                                      train_dataset=data, eval_dataset=Dataset.from_list(make_rows(2, seed=1)),
                                      processing_class=tok)
trainer.train()
trainer.evaluate()
trainer.push_to_hub(commit_message="merged student")
print(json.dumps({"ok": True}))
