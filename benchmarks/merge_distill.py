"""MergeDistill benchmark: merge an English and a multilingual masked LM into one small student.

One command reproduces the table of docs/merge_distill.md:

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/merge_distill.py --config cpu
    # a 2-3-minute end-to-end check of the pipeline, downstream stage included (numbers meaningless)
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/merge_distill.py --config smoke

Stages (each recorded in ``<work_dir>/results.json`` as it finishes; a rerun resumes after the last
finished stage, reusing the saved teachers, signal cache and students):

1. text: ``debian_ddtp.jsonl.xz`` rows of the chosen languages; sources that debian_sections20 puts
   in val/test (sha1("split:" + source) % 100 >= 70) never reach training: val-hash sources give the
   teacher-selection text, test-hash sources the evaluation text;
2. student vocabulary (needs only the tokenizers): union of the teachers' vocabularies restricted to
   tokens seen ``min_count`` times in the training text of the teacher's languages; coverage on
   train and evaluation text;
3. teachers: all-MiniLM-L6-v2 (English) and multilingual-e5-small (Italian, German) have no trained
   MLM head; their MLM training is continued briefly with the decoder tied to the (frozen) input
   embeddings: the encoder is frozen, the head transform and output bias learn, over the teacher's
   tokens in the student vocabulary;
4. teacher selection table: every teacher on every language's selection text, predicting among its
   tokens seen in that language's training text (the run uses the given assignment; the table says
   what automatic selection would choose);
5. students, same size: ``merge_distill`` (alpha * KD + (1 - alpha) * MLM, teacher-initialised
   embeddings, cached top-k signals) and ``plain_mlm`` (alpha = 0, random initialisation: no teacher
   at all); optionally ``plain_mlm_teacher_init`` (alpha = 0 with teacher-initialised embeddings);
6. per language on held-out text: masked-token top-1 accuracy and pseudo-perplexity of the teacher,
   the students (same tokens: teacher(ℓ)'s tokenization, positions whose token is in the student
   vocabulary, each masked once in ``eval_groups`` rounds);
7. downstream, per language: each model fine-tuned as a 20-way sequence classifier on debian_sections20
   in that language (``load_debian_sections(language=ℓ)``, the DDTP translations) and scored on its
   test split: the teacher's ORIGINAL encoder (``resolve_model``; its MLM continuation froze the encoder,
   so this is the teacher) and every student, each with its own tokenizer (a student: the union
   tokenizer saved with it), on identical rows and hyper-parameters (``cfg['downstream']``): per
   fine-tuning seed s, ``train_per_class`` rows per class drawn from train with seed s (the same rows for
   every model), a fixed test subset (``test_per_class`` per class, seed 0); val is not used. One record
   per (language, model, student seed, fine-tuning seed) as it finishes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForMaskedLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from ki_trainer.data import cap_per_class, load_debian_sections  # noqa: E402
from ki_trainer.merge_distill import (  # noqa: E402
    MaskedLMTeacher,
    MergeDistillConfig,
    MergeDistillTrainer,
    StudentVocabulary,
    build_student,
    count_tokens,
    fine_tune_accuracy,
    masked_lm_logits,
    score_masked_lm,
    select_teachers,
)
from ki_trainer.merge_distill.masking import mask_tokens  # noqa: E402
from ki_trainer.merge_distill.signals import _restricted_head  # noqa: E402
from ki_trainer.pretrained import resolve_model  # noqa: E402

DDTP = Path(os.environ.get("KI_SHARED_DATA", "/work/shared/data")) / "debian_ddtp.jsonl.xz"

CONFIGS = {
    "cpu": dict(
        languages={"en": "all-MiniLM-L6-v2", "it": "multilingual-e5-small", "de": "multilingual-e5-small"},
        train_rows=800, select_rows=30, eval_rows=100, max_length=48,
        teacher_rows=600, teacher_epochs=12, teacher_lr=2e-3, teacher_batch=256,
        min_count=2, student_layers=2, student_hidden=384, student_heads=6, student_ffn=1024,
        epochs=2, batch=32, lr=5e-4, alpha=0.5, top_k=8, eval_groups=7, seeds=[0],
        variants=["merge_distill", "plain_mlm", "plain_mlm_teacher_init"],
        downstream=dict(train_per_class=10, test_per_class=15, max_length=48, epochs=3, batch=16, lr=1e-4,
                        warmup_ratio=0.1, freeze_word_embeddings=True, seeds=[0, 1, 2]),
    ),
    "smoke": dict(
        languages={"en": "all-MiniLM-L6-v2", "it": "multilingual-e5-small"},
        train_rows=40, select_rows=6, eval_rows=8, max_length=24,
        teacher_rows=24, teacher_epochs=2, teacher_lr=2e-3, teacher_batch=64,
        min_count=1, student_layers=1, student_hidden=384, student_heads=6, student_ffn=256,
        epochs=1, batch=8, lr=5e-4, alpha=0.5, top_k=8, eval_groups=3, seeds=[0],
        variants=["merge_distill", "plain_mlm"],
        downstream=dict(train_per_class=2, test_per_class=2, max_length=24, epochs=1, batch=16, lr=1e-4,
                        warmup_ratio=0.1, freeze_word_embeddings=True, seeds=[0, 1]),
    ),
    "gpu": dict(
        languages={"en": "all-MiniLM-L6-v2", "it": "multilingual-e5-small", "de": "multilingual-e5-small"},
        train_rows=10000, select_rows=200, eval_rows=500, max_length=128,
        teacher_rows=10000, teacher_epochs=20, teacher_lr=2e-3, teacher_batch=256,
        min_count=2, student_layers=4, student_hidden=384, student_heads=6, student_ffn=1536,
        epochs=5, batch=64, lr=5e-4, alpha=0.5, top_k=8, eval_groups=7, seeds=[0, 1, 2],
        variants=["merge_distill", "plain_mlm", "plain_mlm_teacher_init"],
        downstream=dict(train_per_class=None, test_per_class=None, max_length=128, epochs=3, batch=32, lr=1e-4,
                        warmup_ratio=0.1, freeze_word_embeddings=False, seeds=[0, 1, 2]),
    ),
}


# ---------------------------------------------------------------------- records
class Record:
    """results.json, rewritten atomically after every stage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, ensure_ascii=False))
        os.replace(tmp, self.path)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str):
        return self.data[key]

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.save()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------- 1. text
def split_of(source: str) -> str:
    """debian_sections20's split rule (data/README): train if u < 70, val if u < 80, else test."""
    u = int(hashlib.sha1(f"split:{source}".encode()).hexdigest(), 16) % 100
    return "train" if u < 70 else "val" if u < 80 else "test"


def load_text(cfg: dict) -> dict[str, dict[str, list[dict]]]:
    """Per language: train / select / eval rows ``{id, text, language}``, shuffled deterministically."""
    wanted = set(cfg["languages"])
    pools: dict[str, dict[str, list[dict]]] = {lang: {"train": [], "val": [], "test": []} for lang in wanted}
    with lzma.open(DDTP, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if row["lang"] in wanted and row["text"].strip():
                pools[row["lang"]][split_of(row["source"])].append(
                    {"id": f"{row['lang']}:{row['package']}", "text": row["text"], "language": row["lang"]}
                )
    out = {}
    for lang, pool in pools.items():
        rng = random.Random(f"md-{lang}")
        for rows in pool.values():
            rng.shuffle(rows)
        out[lang] = {"train": pool["train"][: cfg["train_rows"]], "select": pool["val"][: cfg["select_rows"]],
                     "eval": pool["test"][: cfg["eval_rows"]]}
        if len(out[lang]["train"]) < cfg["train_rows"]:
            raise ValueError(f"Only {len(out[lang]['train'])} training rows for {lang!r}.")
    return out


# ---------------------------------------------------------------------- 2. teachers
def continue_mlm_training(model, tokenizer, texts, cfg: dict, columns: torch.Tensor, seed: int = 0) -> dict:
    """Continued MLM training of the head, with the decoder tied to the frozen input embeddings.

    The encoder stays frozen: each text is masked once (15%, 80/10/10, only tokens in ``columns``, the
    teacher's tokens in the student vocabulary), the encoder runs once, and the head transform and output
    bias are trained for ``teacher_epochs`` epochs on the hidden states at the masked positions, with
    logits only over ``columns`` (the 250k-row output layer of e5 dominates the cost otherwise).
    """
    torch.manual_seed(seed)
    model.eval()
    model.requires_grad_(False)
    head = model.cls.predictions
    assert head.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr(), "decoder not tied"
    specials = set(tokenizer.all_special_ids)
    generator = torch.Generator().manual_seed(seed)
    in_columns = torch.zeros(max(len(tokenizer), int(columns.max()) + 1), dtype=torch.bool)
    in_columns[columns] = True
    in_columns[sorted(specials)] = False
    inverse = torch.full((len(in_columns),), -1, dtype=torch.long)
    inverse[columns] = torch.arange(len(columns))
    replacements = torch.nonzero(in_columns).flatten()
    start = time.time()
    hidden, targets = [], []
    with torch.no_grad():
        for begin in range(0, len(texts), 32):
            enc = tokenizer(texts[begin : begin + 32], truncation=True, max_length=cfg["max_length"], padding=True, return_tensors="pt")
            ids, attention = enc["input_ids"], enc["attention_mask"]
            eligible = attention.bool() & in_columns[ids.clamp(max=len(in_columns) - 1)]
            masked, predict = mask_tokens(ids, eligible, tokenizer.mask_token_id, replacements, 0.15, generator)
            hidden.append(model.bert(input_ids=masked, attention_mask=attention)[0][predict])
            targets.append(inverse[ids[predict]])
    hidden, targets = torch.cat(hidden), torch.cat(targets)
    encode_seconds = time.time() - start
    head.transform.requires_grad_(True)
    head.bias.requires_grad_(True)
    params = [*head.transform.parameters(), head.bias]
    optimizer = torch.optim.AdamW(params, lr=cfg["teacher_lr"], weight_decay=0.0)
    losses, steps = [], 0
    for epoch in range(cfg["teacher_epochs"]):
        order = torch.randperm(len(targets), generator=generator)
        for batch in order.split(cfg["teacher_batch"]):
            logits = _restricted_head(model.cls, hidden[batch], columns)
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            steps += 1
    model.requires_grad_(False)
    return {"positions": len(targets), "steps": steps, "first_loss": round(losses[0], 4),
            "last_epoch_loss": round(sum(losses[-max(1, steps // cfg["teacher_epochs"]):]) / max(1, steps // cfg["teacher_epochs"]), 4),
            "encode_seconds": round(encode_seconds, 1), "seconds": round(time.time() - start, 1),
            "trainable_params": sum(p.numel() for p in params)}


def teacher_plan(cfg: dict) -> dict[str, list[str]]:
    """Teacher model -> its languages (from ``cfg['languages']``)."""
    plan: dict[str, list[str]] = {}
    for lang, model in cfg["languages"].items():
        plan.setdefault(model, []).append(lang)
    return plan


def build_teachers(cfg: dict, text, vocabulary: StudentVocabulary, work: Path, record: Record) -> list[MaskedLMTeacher]:
    teachers = []
    for t, (name, languages) in enumerate(teacher_plan(cfg).items()):
        directory = work / "teachers" / name
        key = f"teacher_training:{name}"
        if key not in record or not (directory / "config.json").exists():
            source = resolve_model(name)
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForMaskedLM.from_pretrained(source)
            texts = [r["text"] for lang in languages for r in text[lang]["train"][: cfg["teacher_rows"]]]
            log(f"teacher {name}: continued MLM training on {len(texts)} {'+'.join(languages)} texts")
            stats = continue_mlm_training(model, tokenizer, texts, cfg, vocabulary.mapped_teacher_ids(t))
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            record.put(key, {"languages": languages, "texts": len(texts), **stats})
            log(f"teacher {name}: {stats}")
        teachers.append(MaskedLMTeacher(str(directory), languages=languages, name=name, max_length=cfg["max_length"]))
    return teachers


# ---------------------------------------------------------------------- 4. vocabulary
def teacher_tokenizers(cfg: dict) -> list:
    return [AutoTokenizer.from_pretrained(resolve_model(name)) for name in teacher_plan(cfg)]


def build_vocabulary(cfg: dict, text, record: Record) -> StudentVocabulary:
    """Union of the teachers' vocabularies restricted to tokens seen ``min_count`` times in the training
    text of each teacher's languages (needs only the tokenizers, so it precedes teacher training)."""
    plan = teacher_plan(cfg)
    tokenizers, names = teacher_tokenizers(cfg), list(plan)

    def counts(split: str) -> list[Counter]:
        return [count_tokens(tok, [r["text"] for lang in plan[name] for r in text[lang][split]], cfg["max_length"])
                for tok, name in zip(tokenizers, names)]

    vocabulary = StudentVocabulary.union(tokenizers, names, counts("train"), cfg["min_count"])
    if "vocabulary" not in record:
        record.put("vocabulary", {
            "size": len(vocabulary),
            "teacher_vocab_sizes": dict(zip(names, map(len, tokenizers))),
            "coverage_train": vocabulary.coverage_table(),
            "coverage_eval": [c.as_dict() for c in vocabulary.update_coverage(counts("eval"))],
        })
    return vocabulary


def selection_candidates(cfg: dict, text, teachers) -> dict[str, StudentVocabulary]:
    """Per language: every teacher's tokens seen in that language's training text (the candidates a
    teacher predicts among during selection)."""
    out = {}
    for lang in cfg["languages"]:
        texts = [r["text"] for r in text[lang]["train"]]
        counts = [count_tokens(t.tokenizer, texts, cfg["max_length"]) for t in teachers]
        out[lang] = StudentVocabulary.union([t.tokenizer for t in teachers], [t.name for t in teachers], counts, 1)
    return out


# ---------------------------------------------------------------------- 5. students
def train_student(variant: str, seed: int, cfg: dict, text, teachers, vocabulary, work: Path, record: Record) -> Path:
    directory = work / "students" / f"{variant}-seed{seed}"
    key = f"student:{variant}:{seed}"
    if key in record and (directory / "config.json").exists():
        return directory
    distill = variant == "merge_distill"
    init = variant in ("merge_distill", "plain_mlm_teacher_init")
    student = build_student(
        vocabulary, teachers, hidden_size=cfg["student_hidden"], num_hidden_layers=cfg["student_layers"],
        num_attention_heads=cfg["student_heads"], intermediate_size=cfg["student_ffn"],
        max_position_embeddings=max(64, cfg["max_length"]), init_embeddings=init, seed=seed,
    )
    from datasets import Dataset

    rows = [r for lang in cfg["languages"] for r in text[lang]["train"]]
    random.Random(seed).shuffle(rows)
    args = MergeDistillConfig(
        output_dir=str(directory), report_to="none", use_cpu=not torch.cuda.is_available(), seed=seed,
        alpha=cfg["alpha"] if distill else 0.0, top_k=cfg["top_k"], max_length=cfg["max_length"],
        teacher_output="student_vocabulary",
        teacher_signals="cached" if distill else "on_the_fly", static_masking=False,
        signal_cache_dir=str(work / "teacher_signals"), num_train_epochs=cfg["epochs"],
        per_device_train_batch_size=cfg["batch"], per_device_eval_batch_size=cfg["batch"], learning_rate=cfg["lr"],
        warmup_steps=20, weight_decay=0.01, logging_steps=20, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = MergeDistillTrainer(model=student, args=args, teachers=teachers, vocabulary=vocabulary,
                                  train_dataset=Dataset.from_list(rows))
    cache_seconds = None
    if distill:
        start = time.time()
        trainer.precompute_teacher_signals()
        cache_seconds = round(time.time() - start, 1)
        log(f"{variant} seed {seed}: top-k cache ready in {cache_seconds}s ({trainer.signal_cache.nbytes() / 1e6:.1f} MB)")
    start = time.time()
    trainer.train()
    seconds = round(time.time() - start, 1)
    trainer.save_model()
    trainer.create_model_card()
    history = [h for h in trainer.state.log_history if "loss" in h]
    record.put(key, {"train_seconds": seconds, "cache_seconds": cache_seconds, "steps": trainer.state.global_step,
                     "rows": len(rows), "params": sum(p.numel() for p in student.parameters()),
                     "last_log": history[-1] if history else None})
    log(f"{variant} seed {seed}: trained in {seconds}s, {trainer.state.global_step} steps, last log {history[-1] if history else None}")
    return directory


# ---------------------------------------------------------------------- 6. evaluation
def evaluate_all(cfg: dict, text, teachers, vocabulary, work: Path, record: Record) -> None:
    index = {t.name: i for i, t in enumerate(teachers)}
    for lang, model_name in cfg["languages"].items():
        t = index[model_name]
        texts = [r["text"] for r in text[lang]["eval"]]
        kwargs = dict(groups=cfg["eval_groups"], max_length=cfg["max_length"], vocabulary=vocabulary, teacher_index=t)
        key = f"eval:{lang}:teacher"
        if key not in record:
            start = time.time()
            scores = score_masked_lm(teachers[t].model, teachers[t], texts, candidates="student_vocabulary", **kwargs)
            record.put(key, {**scores, "seconds": round(time.time() - start, 1)})
            log(f"{key}: {record[key]}")
        for variant in cfg["variants"]:
            for seed in cfg["seeds"]:
                key = f"eval:{lang}:{variant}:{seed}"
                if key in record:
                    continue
                student = AutoModelForMaskedLM.from_pretrained(work / "students" / f"{variant}-seed{seed}")
                start = time.time()
                scores = score_masked_lm(student, teachers[t], texts, student=True, **kwargs)
                record.put(key, {**scores, "seconds": round(time.time() - start, 1)})
                log(f"{key}: {record[key]}")


# ---------------------------------------------------------------------- 7. downstream
def downstream_all(cfg: dict, work: Path, record: Record) -> None:
    """Fine-tune every model on debian_sections20 in each language (identical rows and settings for all)."""
    d = cfg["downstream"]
    transformers_logging.set_verbosity_error()  # every load reports the fresh classifier head: expected
    settings = dict(epochs=d["epochs"], batch_size=d["batch"], learning_rate=d["lr"], warmup_ratio=d["warmup_ratio"],
                    max_length=d["max_length"], freeze_word_embeddings=d["freeze_word_embeddings"])
    for lang, teacher in cfg["languages"].items():
        data = load_debian_sections(language=lang)
        labels = sorted(set(data["train"]["label"]))
        test = cap_per_class(data["test"], d["test_per_class"], seed=0)
        # (label, path, student seed): the teacher's original encoder, then every student with its union tokenizer
        models = [(f"teacher ({teacher})", resolve_model(teacher), "-")]
        models += [(f"student: {v}", str(work / "students" / f"{v}-seed{s}"), str(s)) for v in cfg["variants"] for s in cfg["seeds"]]
        for seed in d["seeds"]:
            train = cap_per_class(data["train"], d["train_per_class"], seed=seed)
            for label, path, student_seed in models:
                key = f"downstream:{lang}:{label}:{student_seed}:{seed}"
                if key in record:
                    continue
                result = fine_tune_accuracy(path, train["text"], train["label"], test["text"], test["label"], labels=labels,
                                            seed=seed, **settings)
                record.put(key, result)
                log(f"{key}: accuracy {result['accuracy']:.3f} ({result['seconds']}s, unknown {result['unknown_share']:.3f})")


def downstream_summary(cfg: dict, record: Record) -> dict[str, dict[str, dict]]:
    """language -> model -> test accuracy mean, sample std (None for one run), runs, and the first run's
    rows and tokenizer statistics, over the configured fine-tuning (and student) seeds."""
    seeds, out = cfg["downstream"]["seeds"], {}
    for lang, teacher in cfg["languages"].items():
        rows = {f"teacher ({teacher})": ["-"], **{f"student: {v}": [str(s) for s in cfg["seeds"]] for v in cfg["variants"]}}
        for label, student_seeds in rows.items():
            runs = [record[k] for k in (f"downstream:{lang}:{label}:{s}:{f}" for s in student_seeds for f in seeds) if k in record]
            if not runs:
                continue
            values = [r["accuracy"] for r in runs]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
            first = runs[0]
            out.setdefault(lang, {})[label] = {
                "accuracy_mean": mean, "accuracy_std": std, "runs": len(runs),
                **{k: first[k] for k in ("train_rows", "test_rows", "unknown_share", "mean_tokens_per_text", "truncated_share")},
            }
    return out


def downstream_table(cfg: dict, record: Record) -> str:
    """Test accuracy per (language, model): mean ± sample std over fine-tuning (and student) seeds."""
    lines = ["| language | model | test accuracy | runs | train rows / run | test rows | [UNK] share | tokens per text | texts cut |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lang, models in downstream_summary(cfg, record).items():
        for label, r in models.items():
            std = "-" if r["accuracy_std"] is None else f"{r['accuracy_std']:.3f}"
            lines.append(f"| {lang} | {label} | {r['accuracy_mean']:.3f} ± {std} | {r['runs']} | {r['train_rows']} | "
                         f"{r['test_rows']} | {r['unknown_share']:.3f} | {r['mean_tokens_per_text']:.0f} | {r['truncated_share']:.2f} |")
    return "\n".join(lines)


def table(cfg: dict, record: Record) -> str:
    def cell(key_prefix: str, metric: str, digits: int) -> str:
        values = [record[f"{key_prefix}:{s}"][metric] for s in cfg["seeds"] if f"{key_prefix}:{s}" in record]
        if not values:
            return "-"
        mean = sum(values) / len(values)
        if len(values) == 1:
            return f"{mean:.{digits}f}"
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = ["| language | model | masked-token top-1 acc. | pseudo-perplexity | scored tokens |", "|---|---|---|---|---|"]
    for lang, teacher in cfg["languages"].items():
        row = record.data.get(f"eval:{lang}:teacher")
        if row:
            lines.append(f"| {lang} | teacher ({teacher}) | {row['accuracy']:.3f} | {row['pseudo_perplexity']:.1f} | {row['tokens']} |")
        for variant in cfg["variants"]:
            first = record.data.get(f"eval:{lang}:{variant}:{cfg['seeds'][0]}")
            if first:
                lines.append(f"| {lang} | student: {variant} | {cell(f'eval:{lang}:{variant}', 'accuracy', 3)} | "
                             f"{cell(f'eval:{lang}:{variant}', 'pseudo_perplexity', 1)} | {first['tokens']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
    parser.add_argument("--work_dir", default=None, help="default: outputs/merge_distill/<config>")
    parser.add_argument("--stop_after", default=None, choices=["vocabulary", "teachers", "selection", "students", "evaluation"])
    cli = parser.parse_args()
    cfg = CONFIGS[cli.config]
    work = Path(cli.work_dir or f"outputs/merge_distill/{cli.config}")
    work.mkdir(parents=True, exist_ok=True)
    record = Record(work / "results.json")
    record.put("config", {"name": cli.config, **cfg})
    record.put("environment", {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                               "cuda": torch.cuda.is_available(), "cpus": os.cpu_count()})
    wall = time.time()
    torch.manual_seed(0)
    text = load_text(cfg)
    record.put("rows", {lang: {k: len(v) for k, v in parts.items()} for lang, parts in text.items()})
    vocabulary = build_vocabulary(cfg, text, record)
    log(f"vocabulary: {len(vocabulary)} tokens")
    if cli.stop_after == "vocabulary":
        return
    teachers = build_teachers(cfg, text, vocabulary, work, record)
    if cli.stop_after == "teachers":
        return
    if "selection" not in record:
        start = time.time()
        saved = [list(t.languages) for t in teachers]
        choice, rows = select_teachers(teachers, {lang: [r["text"] for r in text[lang]["select"]] for lang in cfg["languages"]},
                                       groups=cfg["eval_groups"], max_length=cfg["max_length"],
                                       candidates=selection_candidates(cfg, text, teachers))
        for teacher, languages in zip(teachers, saved):
            teacher.languages = languages  # the run uses the given assignment; the table is reported
        record.put("selection", {"chosen": choice, "table": rows, "seconds": round(time.time() - start, 1)})
        log(f"selection: {choice}")
    if cli.stop_after == "selection":
        return
    for seed in cfg["seeds"]:
        for variant in cfg["variants"]:
            train_student(variant, seed, cfg, text, teachers, vocabulary, work, record)
    if cli.stop_after == "students":
        return
    evaluate_all(cfg, text, teachers, vocabulary, work, record)
    if cli.stop_after != "evaluation":
        del teachers  # the downstream stage loads each model itself
        start = time.time()
        downstream_all(cfg, work, record)
        record.put("downstream_seconds_last_invocation", round(time.time() - start, 1))
        record.put("downstream_summary", downstream_summary(cfg, record))
    record.put("wall_seconds_last_invocation", round(time.time() - wall, 1))
    tables = table(cfg, record) + "\n\nDownstream (debian_sections20, fine-tuned per language):\n\n" + downstream_table(cfg, record)
    (work / "table.md").write_text(tables + "\n")
    print(tables)


if __name__ == "__main__":
    main()
