"""Fine-tune one teacher classifier per disjoint class subset: ``ki-trainer train-teachers`` as a script.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python examples/train_teachers.py \
        --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 --split_spec 2x10 \
        --max_train_per_class 20 --max_length 64 --num_train_epochs 1 --per_device_train_batch_size 8 \
        --learning_rate 1e-4 --save_strategy no --output_dir runs/teachers

The code lives in :mod:`ki_trainer.cli.train_teachers` (this file re-exports it, so scripts that load
it as a module keep working); ``python examples/train_teachers.py --help`` lists the options.
"""

from ki_trainer.cli.train_teachers import *  # noqa: F401,F403  (encode, is_cached, train_and_evaluate_teacher, ...)
from ki_trainer.cli.train_teachers import main

if __name__ == "__main__":
    main(prog="examples/train_teachers.py")
