"""Speed benchmark of knowledge integration: what querying the teachers costs, side by side in ONE run.

Rows (a BERT-style student and ``--teachers`` teachers built from configs with RANDOM weights: only
speed matters; every row uses fresh copies of the same weights):

* ``student``   plain fine-tuning step of the student alone (stock ``Trainer.training_step`` with the
                cross-entropy loss, gradient clipping, AdamW step): the cost of a plain student epoch;
* ``naive``     the reference code's shape: per teacher one deterministic pass and K SEQUENTIAL
                dropout-on passes, teachers in fp32 (no autocast), then the same student step;
* ``ours``      ``KnowledgeIntegrationTrainer.training_step``, strategy muki, on-the-fly teacher
                signals: the K passes batched (repeat_interleave, chunked by ``mc_chunk_size``),
                teachers in bf16 on a GPU (``bf16=True`` -> ``teacher_dtype='auto'`` = bf16), fp32 on CPU;
* ``cached``    the same trainer with ``signal_source='cached'``: signals precomputed once (that
                one-off cost is reported separately) and looked up by example id in every step;
* ``top<m>``    on-the-fly with ``mc_top_layers=m``: dropout sampled only in the last m layers;
* GPU extras (``--extras``): ``ours_fp32`` (batched MC, fp32 teachers), ``ours_nocheck``
  (``check_teacher_outputs=False``: no host sync), ``ours_chunk<N>`` (``mc_chunk_size`` sweep).

For the teacher-querying rows the teacher query alone (no student) is timed as well (``query s``).
``--real-text`` adds debian_sections20 texts tokenized three ways (padded to max length, dynamic
padding, dynamic padding over length-grouped batches) through the on-the-fly MUKI step, to show that
the work follows the real (non-pad) token count.

Every timing: warm-up calls first, then ``--repeats`` repeats of ``--steps`` calls, median of the
per-call times. CUDA: CUDA events, ``torch.cuda.max_memory_allocated`` per row. CPU: perf_counter,
and the process RSS high-water mark (cumulative over the run, so only its growth is informative).

    # CPU (2 cores): ~10 minutes
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/speed.py --real-text
    # GPU (H100): BERT-base, seq 128, batches 16 and 64, K=16
    HF_HUB_OFFLINE=1 python benchmarks/speed.py --real-text

No ``datasets``/``evaluate`` import anywhere on this path (the GPU image lacks both).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import transformers  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from _speed_models import (  # noqa: E402
    ColumnTable,
    PretokenizedCollator,
    Timer,
    build_models,
    clone,
    count_params,
    length_grouped,
    load_debian_texts,
    load_tokenizer,
    memory_report,
    reset_memory,
    step_flops,
    synthetic_rows,
    synthetic_tokenizer,
    to_device,
)
from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer, Teacher  # noqa: E402
from ki_trainer.numerics import certainty_from_probs  # noqa: E402
from ki_trainer.strategies import TeacherSignals  # noqa: E402

TARGETS = {
    "ours_vs_naive_min": 5.0,  # at batch 16 on an H100
    "pct_peak_min": 60.0,  # on-the-fly MUKI at batch 64 on an H100
    "cached_vs_student_max": 1.15,
    "top_vs_full_min": 2.0,  # at K = 16
}


# ---------------------------------------------------------------------------------------------- naive
@torch.no_grad()
def naive_signals(teachers: list[Teacher], inputs: dict, mc_samples: int) -> TeacherSignals:
    """The reference implementation's shape: per teacher, one eval pass and K sequential dropout-on
    passes, in the teachers' own (fp32) precision, softmax per pass, mean, entropy certainty."""
    logits, certainty = [], []
    for teacher in teachers:
        model = teacher.model
        accepted = teacher.accepted_inputs()
        own = {k: v for k, v in inputs.items() if k in accepted}
        model.eval()
        logits.append(model(**own).logits.float())
        model.train()
        probs = [torch.softmax(model(**own).logits.float(), dim=-1) for _ in range(mc_samples)]
        model.eval()
        certainty.append(certainty_from_probs(torch.stack(probs).mean(0)))
    return TeacherSignals(logits=logits, certainty=torch.stack(certainty, dim=1))


# ---------------------------------------------------------------------------------------------- context
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.timer = Timer(self.device)
        self.tmp = Path(tempfile.mkdtemp(prefix="ki_speed_"))
        self.student, self.teachers, self.teacher_labels = build_models(
            args.size, args.labels_per_teacher, args.teachers, seed=args.seed
        )
        self.rows: list[dict[str, Any]] = []
        self.precompute: dict[str, Any] = {}

    # ------------------------------------------------------------------ builders
    def common_args(self, batch: int) -> dict[str, Any]:
        return dict(
            output_dir=str(self.tmp / "out"),
            report_to="none",
            bf16=self.cuda,
            use_cpu=not self.cuda,
            per_device_train_batch_size=batch,
            per_device_eval_batch_size=batch,
            disable_tqdm=True,
            save_strategy="no",
            seed=self.args.seed,
        )

    def make_teachers(self) -> list[Teacher]:
        return [
            Teacher(clone(model), labels=labels, name=f"teacher{i}")
            for i, (model, labels) in enumerate(zip(self.teachers, self.teacher_labels))
        ]

    def finish_trainer(self, trainer: Trainer):
        """What Trainer.train() does before its loop, for a single process: optimizer, prepared model."""
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, read by training_step
        trainer.create_optimizer()
        model = trainer.accelerator.prepare_model(trainer.model)  # wraps forward in autocast under bf16
        return model

    def ki_trainer(self, batch: int, dataset=None, with_ids: bool = False, collator=None, tokenizer=None, **overrides):
        config = KnowledgeIntegrationConfig(
            **self.common_args(batch), strategy="muki", mc_samples=self.args.mc_samples, **overrides
        )
        if collator is None and tokenizer is None:
            collator = PretokenizedCollator(with_ids=with_ids)
        trainer = KnowledgeIntegrationTrainer(  # collator None + tokenizer: the default KnowledgeIntegrationCollator
            model=clone(self.student),
            args=config,
            data_collator=collator,
            processing_class=tokenizer,
            train_dataset=dataset,
            teachers=self.make_teachers(),
        )
        return trainer, self.finish_trainer(trainer)

    def step_fn(self, trainer: Trainer, model, batches: list[dict]):
        optimizer = trainer.optimizer
        clip = trainer.args.max_grad_norm

        def step(i: int) -> None:
            trainer.training_step(model, batches[i % len(batches)])
            if clip:
                trainer.accelerator.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def synthetic_batches(self, batch: int, with_ids: bool) -> tuple[list[dict], ColumnTable]:
        rows = synthetic_rows(self.args.pool_batches * batch, self.args.seq, self.student.config.vocab_size, seed=batch)
        collate = PretokenizedCollator(with_ids=with_ids)
        batches = [
            to_device(collate(rows[i : i + batch]), self.device) for i in range(0, len(rows), batch)
        ]
        return batches, ColumnTable(rows)

    # ------------------------------------------------------------------ rows
    # A row builder returns a spec: {"name", "batch", "trainer", "step", "query" (or None),
    # "batches", "flops", "extra"}. ``run_rows`` times the specs one after another (GPU: per-row
    # peak memory) or interleaved round-robin (CPU: a load that drifts hits every row alike).
    def build_student(self, batch: int) -> dict:
        batches, _ = self.synthetic_batches(batch, with_ids=False)
        trainer = Trainer(
            model=clone(self.student),
            args=TrainingArguments(**self.common_args(batch)),
            data_collator=PretokenizedCollator(),
        )
        model = self.finish_trainer(trainer)
        return dict(
            name="student", batch=batch, trainer=trainer, step=self.step_fn(trainer, model, batches), query=None,
            batches=batches, flops=step_flops(self.student.config, [], batch, self.args.seq, "student", self.args.mc_samples),
            extra=dict(optim=str(trainer.args.optim), loss="cross-entropy on gold labels (stock Trainer)"),
        )

    def build_on_the_fly(self, name: str, batch: int, naive: bool = False, top: Optional[int] = None, **overrides) -> dict:
        a = self.args
        batches, _ = self.synthetic_batches(batch, with_ids=False)
        if naive:
            overrides["teacher_dtype"] = "float32"
        trainer, model = self.ki_trainer(batch, mc_top_layers=top, **overrides)
        if naive:
            # Same trainer, same student step and loss; only the teacher query is the sequential loop.
            trainer.query_signals = lambda student_inputs, teacher_batches=None, **_: naive_signals(
                trainer.teachers, student_inputs, a.mc_samples
            )
        inputs = [{k: v for k, v in b.items() if k not in ("labels", "example_ids")} for b in batches]
        mode = "top" if top else "naive" if naive else "ours"
        flops = step_flops(
            self.student.config, [t.config for t in self.teachers], batch, a.seq, mode, a.mc_samples, top_layers=top
        )
        return dict(
            name=name, batch=batch, trainer=trainer, step=self.step_fn(trainer, model, batches),
            query=lambda i: trainer.query_signals(inputs[i % len(inputs)]), batches=batches, flops=flops,
            extra=dict(
                teacher_dtype=str(trainer.args.resolved_teacher_dtype()),
                mc_top_layers=top,
                mc_chunk_size=trainer.args.mc_chunk_size,
                check_teacher_outputs=trainer.args.check_teacher_outputs,
                teacher_query="sequential K passes (naive_signals)" if naive else "ki_trainer.query_teachers",
                query_flops=flops["teachers"],
                optim=str(trainer.args.optim),
            ),
        )

    def build_cached(self, batch: int) -> dict:
        batches, table = self.synthetic_batches(batch, with_ids=True)
        cache_dir = self.tmp / f"cache_{batch}"
        # The batches are pre-tokenized (data_collator=PretokenizedCollator); the tokenizer only feeds the
        # cache fingerprint, which (ki_trainer at the time of writing) needs a student tokenizer.
        trainer, model = self.ki_trainer(
            batch, dataset=table, with_ids=True, tokenizer=synthetic_tokenizer(),
            collator=PretokenizedCollator(with_ids=True), signal_source="cached", signal_cache_dir=str(cache_dir),
            router="mc_entropy",  # the same MUKI signals as the on-the-fly rows (no pooled features)
        )
        reset_memory(self.device)
        self.timer.sync()
        t0 = time.perf_counter()
        trainer.signal_fingerprint()
        fingerprint_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache = trainer.precompute_teacher_signals(table)
        self.timer.sync()
        precompute_s = time.perf_counter() - t0
        query_part = max(precompute_s - fingerprint_s, 1e-9)
        self.precompute[str(batch)] = {
            "examples": len(cache),
            "batch": batch,
            "seconds_total": precompute_s,
            "seconds_fingerprint": fingerprint_s,
            "seconds_per_example_excl_fingerprint": query_part / len(cache),
            "examples_per_s_excl_fingerprint": len(cache) / query_part,
            "memory": memory_report(self.device),
            "includes": "teacher-weight fingerprint, deterministic + MC queries, torch.save of the cache file",
        }
        print(
            f"  precompute     bs {batch:<3} {precompute_s:8.2f} s for {len(cache)} examples "
            f"(fingerprint {fingerprint_s:.2f} s)",
            flush=True,
        )
        if self.cuda:
            reset_memory(self.device)  # the step's peak memory excludes the precompute
        return dict(
            name="cached", batch=batch, trainer=trainer, step=self.step_fn(trainer, model, batches), query=None,
            batches=batches, flops=step_flops(self.student.config, [], batch, self.args.seq, "cached", self.args.mc_samples),
            extra=dict(optim=str(trainer.args.optim)),
        )

    def release(self, spec: dict) -> None:
        """Drop every reference the row's trainer holds."""
        trainer = spec.pop("trainer")
        for key in ("step", "query", "batches"):
            spec.pop(key, None)
        trainer.accelerator.free_memory()
        trainer.optimizer = trainer.lr_scheduler = None
        trainer.model = trainer.model_wrapped = None
        if isinstance(trainer, KnowledgeIntegrationTrainer):
            trainer.teachers, trainer.signal_cache, trainer._last_signals = [], None, None
            trainer.querier = trainer.cached_signals = None
        del trainer
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def record(self, spec: dict, step_times: list[float], query_times: Optional[list[float]], memory: Any) -> dict:
        seconds = statistics.median(step_times)
        batches, flops, batch = spec["batches"], spec["flops"], spec["batch"]
        real_tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
        processed = statistics.mean(b["input_ids"].numel() for b in batches)
        row = {
            "row": spec["name"],
            "batch": batch,
            "seq": self.args.seq,
            "mc_samples": self.args.mc_samples,
            "seconds_per_step": seconds,
            "all_seconds": step_times,
            "samples_per_s": batch / seconds,
            "tokens_per_s": real_tokens / seconds,
            "processed_tokens_per_s": processed / seconds,
            "flops_per_step": flops["total"],
            "achieved_tflops": flops["total"] / seconds / 1e12,
            "pct_of_peak": (100 * flops["total"] / seconds / (self.args.peak_tflops * 1e12)) if self.cuda else None,
            "query_seconds": statistics.median(query_times) if query_times else None,
            "all_query_seconds": query_times,
            "memory": memory,
        }
        row.update(spec["extra"])
        self.rows.append(row)
        qs = row["query_seconds"]
        print(
            f"  {row['row']:<14} bs {batch:<3} {seconds * 1000:9.1f} ms/step  {row['samples_per_s']:8.2f} samples/s"
            + (f"  query {qs * 1000:8.1f} ms" if qs else ""),
            flush=True,
        )
        return row

    def run_rows(self, builders: list) -> None:
        a = self.args
        if not a.interleave:
            for build in builders:
                reset_memory(self.device)
                spec = build()
                timing = self.timer.measure(spec["step"], a.warmup, a.repeats, a.steps)
                query = None
                if spec["query"] is not None:
                    query = self.timer.measure(spec["query"], a.query_warmup, a.query_repeats, a.steps)["all_seconds"]
                self.record(spec, timing["all_seconds"], query, memory_report(self.device))
                self.release(spec)
            return
        specs = [build() for build in builders]
        calls: dict[int, int] = {}
        for spec in specs:
            for i in range(a.warmup - 1):
                spec["step"](i)
            last = self.timer.once(spec["step"], 1, max(a.warmup - 1, 0))  # the last warm-up step, timed
            # cheap rows (student, cached) get more steps per repeat: each repeat lasts >= --min-repeat-seconds
            calls[id(spec)] = max(a.steps, min(50, round(a.min_repeat_seconds / max(last, 1e-6))))
        steps: dict[int, list[float]] = {id(s): [] for s in specs}
        queries: dict[int, list[float]] = {id(s): [] for s in specs}
        for r in range(a.repeats):
            for spec in specs:
                n = calls[id(spec)]
                steps[id(spec)].append(self.timer.once(spec["step"], n, a.warmup + r * n))
        for r in range(a.query_repeats):
            for spec in specs:
                if spec["query"] is None:
                    continue
                if r == 0:
                    for i in range(a.query_warmup):
                        spec["query"](i)
                queries[id(spec)].append(self.timer.once(spec["query"], a.steps, r * a.steps))
        memory = "n/a per row (rows interleaved in one process; see rss_hwm_mib_end_of_run)"
        for spec in specs:
            spec["extra"]["steps_per_repeat"] = calls[id(spec)]
            self.record(spec, steps[id(spec)], queries[id(spec)] or None, memory)
        for spec in specs:
            self.release(spec)

    # ------------------------------------------------------------------ real text
    def real_text(self) -> dict[str, Any]:
        """One on-the-fly MUKI trainer; the same debian texts batched three ways, passes interleaved."""
        a = self.args
        texts = load_debian_texts("train")
        tokenizer, tokenizer_source = load_tokenizer(a.tokenizer, texts)
        batch = a.real_batch or a.batch[0]
        n = a.real_batches * batch
        pool = random.Random(a.seed).sample(texts, n)
        trainer, model = self.ki_trainer(batch, tokenizer=tokenizer, max_length=a.real_max_length)
        collate = trainer.data_collator  # the default KnowledgeIntegrationCollator: dynamic padding
        lengths = [len(ids) for ids in tokenizer(pool, truncation=True, max_length=a.real_max_length)["input_ids"]]
        variants = {
            "pad_to_max_length": [
                dict(tokenizer(pool[i : i + batch], padding="max_length", truncation=True,
                               max_length=a.real_max_length, return_tensors="pt"))
                for i in range(0, n, batch)
            ],
            "dynamic_padding": [collate([{"text": t} for t in pool[i : i + batch]]) for i in range(0, n, batch)],
            "dynamic_length_grouped": [
                collate([{"text": pool[j]} for j in group]) for group in length_grouped(lengths, batch, a.seed)
            ],
        }
        variants = {k: [to_device(b, self.device) for b in v] for k, v in variants.items()}
        steps = {k: self.step_fn(trainer, model, v) for k, v in variants.items()}
        print(
            f"real text: {n} debian train texts, batch {batch}, max_length {a.real_max_length}, "
            f"on-the-fly muki, tokenizer: {tokenizer_source}",
            flush=True,
        )
        shortest = min((b for v in variants.values() for b in v), key=lambda b: b["input_ids"].numel())
        self.step_fn(trainer, model, [shortest])(0)  # optimizer state, allocator
        for name, v in variants.items():
            for _ in range(a.real_warmup):
                self.timer.once(steps[name], len(v))
        passes: dict[str, list[float]] = {k: [] for k in variants}
        peaks: dict[str, Optional[float]] = {k: None for k in variants}
        n_batches = len(next(iter(variants.values())))
        for _ in range(a.real_repeats):
            # Interleaved step by step (batch j of every variant, then batch j + 1): a drifting load hits
            # every variant alike. Timing single steps costs one sync per step on a GPU (negligible here).
            totals = {k: 0.0 for k in variants}
            for j in range(n_batches):
                for name in variants:
                    reset_memory(self.device)
                    totals[name] += self.timer.once(steps[name], 1, j)
                    if self.cuda:
                        peaks[name] = max(peaks[name] or 0.0, memory_report(self.device)["peak_allocated_mib"])
            for name in variants:
                passes[name].append(totals[name])
        results = {}
        for name, v in variants.items():
            seconds = statistics.median(passes[name])
            real = sum(int(b["attention_mask"].sum()) for b in v)
            processed = sum(b["input_ids"].numel() for b in v)
            flops = sum(
                step_flops(self.student.config, [t.config for t in self.teachers], b["input_ids"].shape[0],
                           b["input_ids"].shape[1], "ours", a.mc_samples)["total"]
                for b in v
            )
            results[name] = {
                "texts": n,
                "batches": len(v),
                "padded_lengths": [int(b["input_ids"].shape[1]) for b in v],
                "seconds_per_pass": seconds,
                "all_seconds_per_pass": passes[name],
                "samples_per_s": n / seconds,
                "real_tokens_per_s": real / seconds,
                "processed_tokens_per_s": processed / seconds,
                "real_tokens": real,
                "processed_tokens": processed,
                "padding_fraction": 1 - real / processed,
                "flops_per_pass": flops,
                "pct_of_peak": (100 * flops / seconds / (a.peak_tflops * 1e12)) if self.cuda else None,
                "peak_allocated_mib": peaks[name],
            }
        base = results["pad_to_max_length"]
        for name, r in results.items():
            r["speedup_vs_pad_to_max"] = base["seconds_per_pass"] / r["seconds_per_pass"]
            r["processed_tokens_vs_pad_to_max"] = r["processed_tokens"] / base["processed_tokens"]
            print(
                f"  {name:<24} {r['samples_per_s']:8.2f} samples/s {r['real_tokens_per_s']:9.1f} real tok/s  "
                f"padding {100 * r['padding_fraction']:5.1f}%  processed tokens x{r['processed_tokens_vs_pad_to_max']:.2f}  "
                f"time x{1 / r['speedup_vs_pad_to_max']:.2f}  (pass {r['seconds_per_pass']:.2f} s)",
                flush=True,
            )
        pad_multiple = getattr(collate, "pad_to_multiple_of", None)
        self.release({"trainer": trainer})
        return {
            "tokenizer": tokenizer_source,
            "batch": batch,
            "max_length": a.real_max_length,
            "row": "ours: on-the-fly muki training_step (teachers read the student's encoding)",
            "pad_to_multiple_of": pad_multiple,
            "variants": results,
        }


# ---------------------------------------------------------------------------------------------- report
def ratios(rows: list[dict], precompute: dict, args) -> dict[str, Any]:
    by = {(r["row"], r["batch"]): r for r in rows}
    out: dict[str, Any] = {}
    for batch in args.batch:
        get = lambda name: by.get((name, batch))  # noqa: E731
        entry: dict[str, Any] = {}
        naive, ours, student, cached = get("naive"), get("ours"), get("student"), get("cached")
        if naive and ours:
            entry["ours_vs_naive_step"] = naive["seconds_per_step"] / ours["seconds_per_step"]
            entry["ours_vs_naive_query"] = naive["query_seconds"] / ours["query_seconds"]
        if cached and student:
            entry["cached_step_vs_student_step"] = cached["seconds_per_step"] / student["seconds_per_step"]
        if ours and student:
            entry["ours_step_vs_student_step"] = ours["seconds_per_step"] / student["seconds_per_step"]
        for m in args.top_layers:
            top = get(f"top{m}")
            if top and ours:
                entry[f"top{m}_vs_full_step"] = ours["seconds_per_step"] / top["seconds_per_step"]
                entry[f"top{m}_vs_full_query"] = ours["query_seconds"] / top["query_seconds"]
        if ours and cached and str(batch) in precompute:
            saved = (ours["seconds_per_step"] - cached["seconds_per_step"]) / batch
            per_example = precompute[str(batch)]["seconds_per_example_excl_fingerprint"]
            entry["precompute_in_on_the_fly_epochs"] = per_example / (ours["seconds_per_step"] / batch)
            entry["cached_break_even_epochs"] = (per_example / saved) if saved > 0 else None
        if ours and ours.get("pct_of_peak") is not None:
            entry["ours_pct_of_peak"] = ours["pct_of_peak"]
        out[str(batch)] = entry
    return out


def print_table(rows: list[dict], cuda: bool) -> None:
    by = {(r["row"], r["batch"]): r for r in rows}
    header = f"{'row':<14}{'bs':>4}{'ms/step':>10}{'samples/s':>11}{'tokens/s':>11}{'vs naive':>9}{'vs student':>11}{'query ms':>10}{'TFLOP/s':>9}"
    header += f"{'% peak':>8}{'peak MiB':>10}" if cuda else f"{'memory':>8}"
    print("\n" + header + ("" if cuda else "   (CPU: % of peak n/a; per-row memory n/a, see JSON)"))
    print("-" * len(header))
    for r in rows:
        naive = by.get(("naive", r["batch"]))
        student = by.get(("student", r["batch"]))
        vs_naive = f"{naive['seconds_per_step'] / r['seconds_per_step']:.2f}x" if naive else "-"
        vs_student = f"{r['seconds_per_step'] / student['seconds_per_step']:.2f}x" if student else "-"
        query = f"{r['query_seconds'] * 1000:.1f}" if r.get("query_seconds") else "-"
        line = (
            f"{r['row']:<14}{r['batch']:>4}{r['seconds_per_step'] * 1000:>10.1f}{r['samples_per_s']:>11.1f}"
            f"{r['tokens_per_s']:>11.0f}{vs_naive:>9}{vs_student:>11}{query:>10}{r['achieved_tflops']:>9.3f}"
        )
        mem = r["memory"]
        if cuda:
            peak = mem["peak_allocated_mib"] if isinstance(mem, dict) else float("nan")
            line += f"{r['pct_of_peak']:>8.1f}{peak:>10.0f}"
        else:
            line += f"{'n/a':>8}"
        print(line)


def git_state() -> dict[str, Any]:
    """Commit and locally modified files of the checkout (read-only git calls; None without git)."""
    import subprocess

    def run(*cmd: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = run("status", "--short", "--", "ki_trainer")
    return {"commit": run("rev-parse", "HEAD"), "ki_trainer_modified": status.splitlines() if status else []}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=["base", "small", "tiny"], help="base (GPU default) / small (CPU default)")
    parser.add_argument("--seq", type=int, help="sequence length of the synthetic rows (GPU 128, CPU 64)")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (GPU 16 64, CPU 8)")
    parser.add_argument("--mc-samples", type=int, default=16)
    parser.add_argument("--top-layers", type=int, nargs="*", help="mc_top_layers values (GPU 1 2 3, CPU 1 2)")
    parser.add_argument("--teachers", type=int, default=2)
    parser.add_argument("--labels-per-teacher", type=int, default=10)
    parser.add_argument("--rows", nargs="+", default=["student", "naive", "ours", "cached", "top"],
                        choices=["student", "naive", "ours", "cached", "top"])
    parser.add_argument("--extras", action=argparse.BooleanOptionalAction, default=None,
                        help="GPU extras: fp32 teachers batched, no NaN check, mc_chunk_size sweep (default: on GPU)")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--warmup", type=int, help="warm-up steps per row (GPU 3, CPU 2)")
    parser.add_argument("--repeats", type=int, help="timed repeats per row, median taken (GPU 5, CPU 3)")
    parser.add_argument("--steps", type=int, help="steps per timed repeat (GPU 10, CPU 1)")
    parser.add_argument("--min-repeat-seconds", type=float, default=2.0,
                        help="interleaved mode: steps per repeat raised until one repeat lasts about this long")
    parser.add_argument("--query-warmup", type=int, help="warm-up teacher queries per row (GPU 3, CPU 0: the steps warmed up)")
    parser.add_argument("--query-repeats", type=int, help="timed repeats of the teacher query alone (GPU 5, CPU 2)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                        help="build all rows of a batch size first and time them round-robin (default: on CPU, "
                        "where the load drifts; off on GPU, where per-row peak memory is reported)")
    parser.add_argument("--pool-batches", type=int, help="distinct batches cycled through (GPU 4, CPU 2)")
    parser.add_argument("--real-text", action="store_true", help="add the debian_sections20 padding comparison")
    parser.add_argument("--only-real-text", action="store_true")
    parser.add_argument("--real-max-length", type=int, default=128)
    parser.add_argument("--real-batch", type=int, help="default: the first --batch")
    parser.add_argument("--real-batches", type=int, help="batches per padding variant (GPU 32, CPU 4)")
    parser.add_argument("--real-warmup", type=int, help="warm-up passes per padding variant (GPU 1, CPU 0)")
    parser.add_argument("--real-repeats", type=int, help="passes per variant (GPU 3, CPU 1)")
    parser.add_argument("--tokenizer", help="tokenizer directory for --real-text (default: local bert-uncased vocab or in-process)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM: 989)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/speed_<device>.json)")
    args = parser.parse_args(argv)

    cuda = args.device.startswith("cuda")
    defaults = dict(
        size="base" if cuda else "small", seq=128 if cuda else 64, batch=[16, 64] if cuda else [8],
        top_layers=[1, 2, 3] if cuda else [1, 2], extras=cuda, warmup=3 if cuda else 2, repeats=5 if cuda else 3,
        steps=10 if cuda else 1, real_batches=32 if cuda else 3, real_repeats=3 if cuda else 1,
        query_warmup=3 if cuda else 0, query_repeats=5 if cuda else 2, interleave=not cuda,
        pool_batches=4 if cuda else 2, real_warmup=1 if cuda else 0,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"speed_{'cuda' if cuda else 'cpu'}.json"

    load_before = os.getloadavg()
    started = time.time()
    bench = Bench(args)
    device_name = torch.cuda.get_device_name(bench.device) if cuda else (platform.processor() or platform.machine())
    s_cfg, t_cfg = bench.student.config, bench.teachers[0].config
    print(
        f"device {device_name} | torch {torch.__version__} | transformers {transformers.__version__} | "
        f"threads {torch.get_num_threads()} | load {load_before}\n"
        f"size {args.size} ({t_cfg.num_hidden_layers}x{t_cfg.hidden_size}), seq {args.seq}, K={args.mc_samples}, "
        f"{args.teachers} teachers, batches {args.batch}",
        flush=True,
    )
    real = None
    try:
        if not args.only_real_text:
            for batch in args.batch:
                print(f"batch {batch}:", flush=True)
                builders = []
                if "student" in args.rows:
                    builders.append(lambda b=batch: bench.build_student(b))
                if "naive" in args.rows:
                    builders.append(lambda b=batch: bench.build_on_the_fly("naive", b, naive=True))
                if "ours" in args.rows:
                    builders.append(lambda b=batch: bench.build_on_the_fly("ours", b))
                if "cached" in args.rows:
                    builders.append(lambda b=batch: bench.build_cached(b))
                if "top" in args.rows:
                    for m in args.top_layers:
                        builders.append(lambda b=batch, m=m: bench.build_on_the_fly(f"top{m}", b, top=m))
                if args.extras:
                    builders.append(lambda b=batch: bench.build_on_the_fly("ours_fp32", b, teacher_dtype="float32"))
                    builders.append(lambda b=batch: bench.build_on_the_fly("ours_nocheck", b, check_teacher_outputs=False))
                    for size in args.chunk_sizes:
                        builders.append(lambda b=batch, c=size: bench.build_on_the_fly(f"ours_chunk{c}", b, mc_chunk_size=c))
                bench.run_rows(builders)
        if args.real_text or args.only_real_text:
            real = bench.real_text()
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)

    summary = ratios(bench.rows, bench.precompute, args)
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else f"speed.main({argv})",
        "device": str(bench.device),
        "device_name": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "git": git_state(),
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_seconds": time.time() - started,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "models": {
            "student": {"layers": s_cfg.num_hidden_layers, "hidden": s_cfg.hidden_size, "ffn": s_cfg.intermediate_size,
                        "params": count_params(bench.student, embeddings=True), "params_non_embedding": count_params(bench.student)},
            "teacher": {"layers": t_cfg.num_hidden_layers, "hidden": t_cfg.hidden_size, "ffn": t_cfg.intermediate_size,
                        "params": count_params(bench.teachers[0], embeddings=True),
                        "params_non_embedding": count_params(bench.teachers[0]), "count": args.teachers},
            "weights": "random (built from configs); synthetic rows have no padding, tokens = batch x seq",
        },
        "flop_model": (
            "per forward: 2 x non-embedding matmul params x processed tokens + attention 4 x seq x hidden per token "
            "and layer + pooler/classifier per sequence; student step = 3 forwards (fwd+bwd); full MC = (1 + K) "
            f"teacher forwards; top-m MC = 1 + lower layers once + K x (top m layers + head). % of peak against "
            f"{args.peak_tflops} TFLOP/s (dense bf16, H100/H200 SXM), also for fp32 rows."
        ),
        "targets": TARGETS,
        "rss_hwm_mib_end_of_run": None if cuda else memory_report(bench.device)["rss_hwm_mib_cumulative"],
        "rows": bench.rows,
        "precompute": bench.precompute,
        "ratios": summary,
        "real_text": real,
    }
    if bench.rows:
        print_table(bench.rows, cuda)
    print("\nratios:")
    for batch, entry in summary.items():
        print(f"  bs {batch}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()))
    for batch, p in bench.precompute.items():
        print(f"  precompute bs {batch}: {p['seconds_total']:.2f} s total for {p['examples']} examples, "
              f"{p['examples_per_s_excl_fingerprint']:.1f} examples/s excluding the {p['seconds_fingerprint']:.2f} s fingerprint")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out} ({result['wall_seconds']:.0f} s, load {load_before} -> {result['load_average_after']})")
    return result


if __name__ == "__main__":
    main()
