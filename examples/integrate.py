"""Merge fine-tuned teachers into one student over the union of their labels, WITHOUT labels.

``ki-trainer integrate`` as a script: every ``TrainingArguments`` option and every
knowledge-integration option of :class:`ki_trainer.KnowledgeIntegrationConfig` is a command-line
flag, and a YAML/JSON run file may come first.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python examples/integrate.py \
        --teachers outputs/teachers/teachers.json \
        --student sentence-transformers/paraphrase-MiniLM-L3-v2 \
        --strategy muki --selection soft --mc_samples 16 --signal_source cached --max_length 64 \
        --num_train_epochs 2 --per_device_train_batch_size 16 --learning_rate 1e-4 \
        --eval_strategy epoch --save_strategy no --report_to none --output_dir outputs/student

It runs unchanged under ``accelerate launch examples/integrate.py ...`` (DDP, mixed precision). On a
CPU-only machine, several processes need ``accelerate launch --multi_gpu --num_processes 2 ... --use_cpu true``
(without ``--use_cpu`` the processes would train independently: the run stops with an error saying so).
The code lives in :mod:`ki_trainer.cli.integrate`.
"""

from ki_trainer.cli.integrate import *  # noqa: F401,F403  (teacher_specs, load_splits, run, ...)
from ki_trainer.cli.integrate import main

if __name__ == "__main__":
    main(prog="examples/integrate.py")
