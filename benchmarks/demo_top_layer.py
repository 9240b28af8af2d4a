"""Does MUKI's routing change when MC dropout is sampled in the top layer only? Checked on the demo's teachers.

Loads the two teachers ``ki-trainer demo`` trained (<demo output>/teachers/teacher_0, teacher_1) and the demo's
rows (debian_sections20, ``--per_class`` training rows and 15 test rows per class, seed ``--seed``), and scores
every row with MC-dropout certainty (``1 - H(mean_k p_k) / log C``, K = ``--mc_samples``) three times: full MC
dropout (seed 0), full MC dropout again with another dropout seed (the noise floor), and top-layer MC
(``mc_top_layers=1``). Prints, for the training pool and the test rows: how often the routed teacher (the most
certain one) agrees between the variants, and, with the gold labels (a check only: nothing is trained here),
the selection accuracy (routed teacher owns the gold class) and the routed-ensemble accuracy; and the CPU time
of each variant.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=2 python benchmarks/demo_top_layer.py outputs/demo \
        --per_class 20 --max_length 32
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from ki_trainer.data import cap_per_class, load_debian_sections
from ki_trainer.querying import mc_dropout_statistics
from ki_trainer.teacher import Teacher


def certainty(teachers, rows, max_length: int, mc_samples: int, top_layers, seed: int):
    """``[N, T]`` MC-entropy certainty and, per teacher, its ``[N]`` predicted class ids."""
    scores, predictions = [], []
    for teacher in teachers:
        enc = teacher.tokenizer(list(rows["text"]), truncation=True, max_length=max_length, padding=True,
                                return_tensors="pt")
        inputs = {key: value for key, value in enc.items() if key in teacher.accepted_inputs()}
        torch.manual_seed(seed)
        mean = mc_dropout_statistics(teacher, inputs, mc_samples, 512, top_layers=top_layers)["mean"]
        scores.append(1 - (-torch.special.xlogy(mean, mean).sum(-1)) / math.log(mean.shape[-1]))
        predictions.append(mean.argmax(-1))
    return torch.stack(scores, 1), predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_output", help="the demo's --output_dir (its teachers/ are read)")
    parser.add_argument("--per_class", type=int, default=20)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--mc_samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed (which rows)")
    args = parser.parse_args()
    paths = [f"{args.demo_output}/teachers/teacher_{i}" for i in range(2)]
    teachers = [Teacher(path, tokenizer=path) for path in paths]
    data = load_debian_sections()
    sets = (("training pool", cap_per_class(data["train"], args.per_class, seed=args.seed)),
            ("test", cap_per_class(data["test"], 15, seed=args.seed)))
    variants = (("full MC", None, 0), ("full MC, other seed", None, 1), ("top-layer MC", 1, 0))
    for name, rows in sets:
        results = {}
        for label, top, seed in variants:
            start = time.process_time()
            results[label] = certainty(teachers, rows, args.max_length, args.mc_samples, top, seed)
            print(f"{name} ({len(rows)} rows), {label}: {time.process_time() - start:.1f} s CPU", flush=True)
        routed = {label: scores.argmax(1) for label, (scores, _) in results.items()}
        same = lambda a, b: (routed[a] == routed[b]).float().mean().item()  # noqa: E731
        print(f"  same teacher: full vs full (other seed) {same('full MC', 'full MC, other seed'):.3f}; "
              f"full vs top-layer {same('full MC', 'top-layer MC'):.3f}")
        owner = torch.tensor([0 if gold in teachers[0].labels else 1 for gold in rows["label"]])
        for label, route in routed.items():
            predictions = results[label][1]
            guesses = [teachers[int(t)].labels[int(predictions[int(t)][i])] for i, t in enumerate(route)]
            accuracy = sum(g == gold for g, gold in zip(guesses, rows["label"])) / len(guesses)
            print(f"  {label}: selection accuracy {(route == owner).float().mean():.3f}, "
                  f"routed-ensemble accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
