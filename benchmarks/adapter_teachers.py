"""LoRA teachers as adapters of ONE shared base vs the same teachers as separate models: memory and speed.

Setup (random weights: only memory and speed matter; the teachers' answers are checked equal):
a BERT encoder of ``--layers`` x ``--hidden`` (default 6 x 384, the all-MiniLM-L6-v2 shape) with a
2-class head; ``--teachers`` LoRA adapters (r=``--rank`` on query/value, random B so they differ, the
classifier in modules_to_save).

* ``separate``: each teacher is its own plain model (its adapter merged in: ``merge_and_unload``), the
  usual way to hold N fine-tuned teachers; N copies of the base weights.
* ``adapters``: one ``PeftModel`` holding all N adapters; ``Teacher(model, adapter=name)`` switches the
  active adapter before each teacher's forward (``set_adapter``); one copy of the base weights.

Memory: bytes of the teachers' parameters and buffers (each distinct tensor counted once), exact.
Speed: ``query_teachers`` over one batch (one deterministic pass + ``--mc`` MC-dropout passes per
teacher, batched), median of ``--repeats`` timed calls after warm-up, both setups in ONE run; plus
the cost of one ``set_adapter`` switch. Writes ``benchmarks/results/adapter_teachers_<device>.json``.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/adapter_teachers.py            # CPU (2 shared cores): a few minutes
    HF_HUB_OFFLINE=1 python benchmarks/adapter_teachers.py --batch 64 --seq 128 --mc 16  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from ki_trainer import Teacher, query_teachers  # noqa: E402


def tensor_bytes(models) -> int:
    seen, total = set(), 0
    for model in models:
        for tensor in list(model.parameters()) + list(model.buffers()):
            key = tensor.data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


def build(args, device):
    config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                        intermediate_size=4 * args.hidden, num_labels=2, max_position_embeddings=512)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config)
    lora = dict(task_type=TaskType.SEQ_CLS, r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "value"],
                init_lora_weights=False)
    names = [f"teacher{i}" for i in range(args.teachers)]
    shared = get_peft_model(base, LoraConfig(**lora), adapter_name=names[0])
    for name in names[1:]:
        shared.add_adapter(name, LoraConfig(**lora))
    separate = []
    for name in names:  # each teacher as its own plain model: a merged copy of base + its adapter
        shared.set_adapter(name)
        copy = get_peft_model(BertForSequenceClassification(config), LoraConfig(**lora), adapter_name=name)
        copy.load_state_dict(
            {k: v for k, v in shared.state_dict().items() if "lora_" not in k or f".{name}." in k}, strict=False)
        separate.append(copy.merge_and_unload())
    for model in separate + [shared]:
        model.to(device).eval().requires_grad_(False)
    labels = [[f"{name}_a", f"{name}_b"] for name in names]
    adapter_teachers = [Teacher(shared, adapter=name, labels=lab) for name, lab in zip(names, labels)]
    separate_teachers = [Teacher(model, labels=lab, name=name) for model, name, lab in zip(separate, names, labels)]
    return shared, separate, adapter_teachers, separate_teachers, config


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", type=int, default=4)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--mc", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    shared, separate, adapter_teachers, separate_teachers, config = build(args, device)
    torch.manual_seed(1)
    inputs = {"input_ids": torch.randint(5, config.vocab_size, (args.batch, args.seq), device=device),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device)}

    # the two setups answer identically (deterministic pass): the adapters really are the teachers
    a = query_teachers(adapter_teachers, [inputs] * args.teachers, certainty_source=None)
    s = query_teachers(separate_teachers, [inputs] * args.teachers, certainty_source=None)
    max_diff = max(float((x - y).abs().max()) for x, y in zip(a.logits, s.logits))
    distinct = float((a.logits[0] - a.logits[-1]).abs().max())

    rows = {}
    for label, teachers in (("separate", separate_teachers), ("adapters", adapter_teachers)):
        median, times = timed(lambda: query_teachers(teachers, [inputs] * args.teachers, certainty_source="mc",
                                                     mc_samples=args.mc), device, args.warmup, args.repeats)
        rows[label] = {"query_s": median, "times_s": times}
    rows["separate"]["teacher_bytes"] = tensor_bytes(separate)
    rows["adapters"]["teacher_bytes"] = tensor_bytes([shared])
    names = list(shared.peft_config)
    switch, _ = timed(lambda: [shared.set_adapter(n, inference_mode=True) for n in names], device, 2, args.repeats)

    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "settings": vars(args),
        "max_abs_logit_difference_adapters_vs_separate": max_diff,
        "max_abs_logit_difference_first_vs_last_teacher": distinct,
        "rows": rows,
        "memory_saved_fraction": 1 - rows["adapters"]["teacher_bytes"] / rows["separate"]["teacher_bytes"],
        "adapters_over_separate_time": rows["adapters"]["query_s"] / rows["separate"]["query_s"],
        "set_adapter_switch_s": switch / len(names),
    }
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"adapter_teachers_{device.type}.json")
    with open(out, "w") as handle:
        json.dump(result, handle, indent=2)
    mb = 1024 ** 2
    print(f"{args.teachers} teachers, {args.layers}x{args.hidden} BERT, LoRA r={args.rank}, batch {args.batch} x seq "
          f"{args.seq}, 1 + {args.mc} MC passes each, on {result['device']}")
    for label, row in rows.items():
        print(f"  {label:9s} teacher memory {row['teacher_bytes'] / mb:8.1f} MiB   query {row['query_s'] * 1e3:8.1f} ms")
    print(f"  memory saved {result['memory_saved_fraction']:.1%}; adapters/separate time "
          f"{result['adapters_over_separate_time']:.3f}; one set_adapter switch {result['set_adapter_switch_s'] * 1e3:.2f} ms; "
          f"answers equal to {max_diff:.1e} (teachers differ by {distinct:.2f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
