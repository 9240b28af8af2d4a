"""Top-layer MC dropout on real teachers: how much faster, and what it does to routing accuracy.

Uses the 2x10 paraphrase-MiniLM-L3-v2 teachers that `benchmarks/quality.py --config reduced` trained
(outputs/bench/reduced/teachers/2x10/seed0) and the same class-balanced test rows (30 per class, 48
tokens). For each certainty source it times the teacher scoring pass and reports routing accuracy
(did the most certain teacher own the gold class). Prints a table and writes JSON.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/top_layer_routing.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from ki_trainer import LabelSpace, Teacher
from ki_trainer.data import cap_per_class, load_debian_sections
from ki_trainer.numerics import certainty_from_probs
from ki_trainer.querying import deterministic_logits, mc_dropout_probs


def certainties(teachers, texts, source: str, k: int, top_layers, max_length: int) -> torch.Tensor:
    scores = []
    for teacher in teachers:
        rows = []
        for start in range(0, len(texts), 32):
            enc = teacher.tokenizer(texts[start : start + 32], truncation=True, max_length=max_length, padding=True,
                                    return_tensors="pt")
            inputs = {key: value for key, value in enc.items() if key in teacher.accepted_inputs()}
            if source == "deterministic":
                probs = torch.softmax(deterministic_logits(teacher, inputs), -1)
            else:
                probs = mc_dropout_probs(teacher, inputs, k, top_layers=top_layers)
            rows.append(certainty_from_probs(probs))
        scores.append(torch.cat(rows))
    return torch.stack(scores, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teachers", default="outputs/bench/reduced/teachers/2x10/seed0")
    parser.add_argument("--mc_samples", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=48)
    parser.add_argument("--per_class", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/top_layer_routing_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    teachers = [Teacher(str(p), tokenizer=str(p), name=p.name) for p in sorted(Path(args.teachers).glob("teacher_*"))]
    for teacher in teachers:
        teacher.prepare(torch.device("cpu"), torch.float32)
    space = LabelSpace([t.labels for t in teachers], [t.name for t in teachers])
    test = cap_per_class(load_debian_sections(split="test"), args.per_class, seed=0)
    texts, gold = test["text"], torch.tensor(space.encode(test["label"]))
    owner = space.ownership()
    layers = len(teachers[0].model.base_model.encoder.layer)
    variants = [("deterministic (entropy)", "deterministic", None)] + [
        (f"MC, top {m} of {layers} layers", "mc", m) for m in range(1, layers)
    ] + [(f"MC, all {layers} layers", "mc", None)]
    rows = []
    for name, source, top in variants:
        start = time.perf_counter()
        scores = certainties(teachers, texts, source, args.mc_samples, top, args.max_length)
        seconds = time.perf_counter() - start
        routing = owner[scores.argmax(1), gold].float().mean().item()
        rows.append({"variant": name, "seconds": round(seconds, 2), "routing_accuracy": round(routing, 4)})
    full = rows[-1]["seconds"]
    for row in rows:
        row["speedup_vs_full_mc"] = round(full / row["seconds"], 2)
    print(f"| variant | scoring time s | speed-up vs full MC | routing accuracy |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['seconds']} | {row['speedup_vs_full_mc']}x | {100 * row['routing_accuracy']:.1f}% |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"teachers": args.teachers, "mc_samples": args.mc_samples, "rows_scored": len(texts),
            "device": "cpu", "torch": torch.__version__, "platform": platform.platform(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg()}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
