"""Construction-time cost of the reliability checks on real models (CPU); numbers in docs/reliability.md.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/reliability_costs.py
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from transformers import AutoModelForSequenceClassification

from ki_trainer.checkpoints import weights_digest
from ki_trainer.data import load_debian_sections
from ki_trainer.pretrained import resolve_model
from ki_trainer.signal_cache import check_texts
from ki_trainer.guards import _same_weights

MODELS = ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-mpnet-base-v2")


def best_of(function: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    for name in MODELS:
        path = resolve_model(name)
        a = AutoModelForSequenceClassification.from_pretrained(path, num_labels=10)
        b = AutoModelForSequenceClassification.from_pretrained(path, num_labels=10)  # same body, other random head
        params = sum(p.numel() for p in a.parameters()) / 1e6
        print(
            f"{name} ({params:.1f} M params): weights_digest {best_of(lambda: weights_digest(a)):.3f} s; "
            f"duplicate check, shared body {best_of(lambda: _same_weights(a, b)):.4f} s; "
            f"bf16 cast copy {best_of(lambda: copy.deepcopy(a).to(torch.bfloat16)):.3f} s"
        )
    texts = list(load_debian_sections()["train"]["text"])
    print(f"check_texts over {len(texts)} debian_sections train rows: {best_of(lambda: check_texts(texts)):.4f} s")
    many = (texts * (1_000_000 // len(texts) + 1))[:1_000_000]
    print(f"check_texts over 1,000,000 rows (repeated texts): {best_of(lambda: check_texts(many), 1):.2f} s")


if __name__ == "__main__":
    main()
