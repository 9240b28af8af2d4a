"""Launched with 2 processes by tests/trainer/test_distributed.py; each rank writes its final weights' checksum."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402
from conftest import TEACHER_SPLIT, build_tokenizer, make_rows, tiny_bert  # noqa: E402
from datasets import Dataset  # noqa: E402

from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher  # noqa: E402

out, mode = sys.argv[1], sys.argv[2]
tok = build_tokenizer()
teachers = [Teacher(tiny_bert(2, len(tok), labels=l, seed=i), name=f"t{i}") for i, l in enumerate(TEACHER_SPLIT)]
rows = make_rows(4, seed=0)
data = Dataset.from_list([{"id": f"r{i}", "text": r["text"], "label": r["label"]} for i, r in enumerate(rows)])
args = KnowledgeIntegrationConfig(
    output_dir=out, max_steps=3, per_device_train_batch_size=4, report_to=[], disable_tqdm=True, save_strategy="no",
    mc_samples=2, logging_steps=1, signal_source=mode, learning_rate=1e-3, seed=0, use_cpu=True,
)
trainer = KnowledgeIntegrationTrainer(model=tiny_bert(4, len(tok), seed=3), args=args, teachers=teachers,
                                      train_dataset=data, eval_dataset=data, processing_class=tok)
trainer.train()
metrics = trainer.evaluate()
checksum = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
rank = trainer.args.process_index
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"world": trainer.args.world_size, "checksum": checksum, "eval": metrics,
               "logged": [h for h in trainer.state.log_history if "loss" in h]}, f)
# Leave the process group cleanly, then skip the interpreter's teardown: a gloo thread destroyed there can still abort
# a rank ("terminate called without an active exception", about 1 run in 30 on a loaded 2-core machine) after all
# the work above is done and written.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
