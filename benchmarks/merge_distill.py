"""MergeDistill benchmark: merge an English and a multilingual masked LM into one student.

One command reproduces docs/results/merge_distill.json and the tables of docs/merge_distill.md:

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=2 python benchmarks/merge_distill.py --config cpu
    # a few-minute end-to-end check of every stage (numbers meaningless)
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/merge_distill.py --config smoke

Stages (each recorded in ``<work_dir>/results.json`` as it finishes; a rerun resumes after the last
finished step, reusing the saved teachers, signal cache, students and features):

1. text: ``debian_ddtp.jsonl.xz`` rows of the chosen languages; sources that debian_sections20 puts in
   val/test (sha1("split:" + source) % 100 >= 70) never reach any MLM training: val-hash sources give
   the teacher-selection text, test-hash sources the held-out evaluation text;
2. the student's tokenizer: the teacher tokenizer that reads the training text of ALL languages best
   (``choose_student_tokenizer``: fewest [UNK] words, keeps case, fewest pieces per word); the student
   reads every language with it, in training and at inference; coverage of each teacher;
3. teachers: all-MiniLM-L6-v2 (English) and multilingual-e5-small (Italian, German) have no trained MLM
   head: the head (transform + output bias, decoder tied to the frozen input embeddings) and the top
   ``teacher_train_layers`` encoder layers are trained on the teacher's languages' training text, logits
   over the teacher's tokens seen in that text (``teacher_overrides``: one teacher's own settings; MiniLM
   needs all its layers retrained to become a masked LM); masked-token top-1 on held-out text against the
   most-frequent-token baseline;
4. teacher selection table (every teacher on every language's selection text; the run uses the given
   assignment): a report only, computed last;
5. students: each start in ``starts`` (a copy of a teacher's encoder with all or every k-th layer, or a
   fresh encoder) is saved untrained (``init_only``); the ``trained`` (variant, start) pairs are trained on
   the same text: ``merge_distill`` (alpha * KD + (1 - alpha) * MLM, cached top-k signals aligned to the
   student's tokens) and ``plain_mlm`` (alpha = 0: the same start, no teacher);
6. per language on held-out text: masked-token top-1 of every teacher and student AS SHIPPED (reloaded
   with its saved tokenizer), and the saved tokenizer's segmentation agreement with the training
   tokenizer (words split identically, [UNK] words where the language's teacher has none);
7. downstream, per language: a linear probe (logistic regression, L-BFGS) on frozen mean-pooled features
   of debian_sections20 in that language: features once per (model, language) for a pool of train rows
   and a fixed test subset; per probe seed, ``train_per_class`` rows per class drawn from the pool;
   identical rows and settings for every model; every teacher on every language.
8. ``docs/results/merge_distill.json`` (``--results``) and the model card of the merged student.
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
    choose_student_tokenizer,
    count_tokens,
    linear_probe_accuracy,
    mean_pooled_features,
    score_masked_lm,
    segmentation_agreement,
    select_teachers,
)
from ki_trainer.merge_distill.masking import mask_tokens  # noqa: E402
from ki_trainer.merge_distill.signals import _restricted_head  # noqa: E402
from ki_trainer.pretrained import resolve_model  # noqa: E402

DDTP = Path(os.environ.get("KI_SHARED_DATA", "/work/shared/data")) / "debian_ddtp.jsonl.xz"
E5, MINILM = "multilingual-e5-small", "all-MiniLM-L6-v2"

CONFIGS = {
    "cpu": dict(
        languages={"en": MINILM, "it": E5, "de": E5},
        train_rows=600, select_rows=30, eval_rows=60, max_length=64,
        teacher_rows=600, teacher_epochs=4, teacher_lr=1e-3, teacher_batch=32, teacher_train_layers=1,
        # all-MiniLM-L6-v2 is no masked LM with its top layer alone retrained (top-1 0.051 vs the most-frequent-token
        # baseline 0.053 on held-out English): all 6 layers (lr 1e-4, head 1e-3) on 2,000 English texts, 2 epochs
        teacher_overrides={MINILM: dict(teacher_rows=2000, teacher_epochs=2, teacher_train_layers=6, teacher_layer_lr=1e-4)},
        starts={"e5_all": dict(init="teacher", teacher=E5, layer_stride=1),
                "e5_every2": dict(init="teacher", teacher=E5, layer_stride=2),
                "minilm_all": dict(init="teacher", teacher=MINILM, layer_stride=1),
                "fresh": dict(init="fresh", layers=4)},
        trained=[["merge_distill", "e5_all"], ["plain_mlm", "e5_all"]],
        extra_trained=[["merge_distill", "e5_every2"], ["plain_mlm", "e5_every2"]],
        student_seeds=[1, 2],  # the ``trained`` pairs again with these training seeds: is KD vs plain MLM seed noise?
        student="merge_distill:e5_all", student_rows=1800, student_max_length=48,
        epochs=1, batch=16, lr=1e-4, alpha=0.5, top_k=8, eval_groups=4, seed=0, freeze_word_embeddings=True,
        probe=dict(pool_per_class=12, train_per_class=10, test_per_class=25, max_length=48, seeds=[0, 1, 2], l2=1e-3),
    ),
    "smoke": dict(
        languages={"en": MINILM, "it": E5},
        train_rows=24, select_rows=4, eval_rows=6, max_length=24,
        teacher_rows=24, teacher_epochs=1, teacher_lr=1e-3, teacher_batch=16, teacher_train_layers=1,
        starts={"e5_every6": dict(init="teacher", teacher=E5, layer_stride=6),
                "fresh": dict(init="fresh", layers=1)},
        trained=[["merge_distill", "e5_every6"], ["plain_mlm", "e5_every6"]],
        student="merge_distill:e5_every6",
        epochs=1, batch=8, lr=5e-5, alpha=0.5, top_k=8, eval_groups=3, seed=0, freeze_word_embeddings=True,
        probe=dict(pool_per_class=2, train_per_class=1, test_per_class=1, max_length=24, seeds=[0, 1], l2=1e-3),
    ),
    "gpu": dict(
        languages={"en": MINILM, "it": E5, "de": E5},
        train_rows=10000, select_rows=200, eval_rows=500, max_length=128,
        teacher_rows=10000, teacher_epochs=6, teacher_lr=1e-3, teacher_batch=64, teacher_train_layers=2,
        teacher_overrides={MINILM: dict(teacher_rows=20000, teacher_epochs=3, teacher_train_layers=6, teacher_layer_lr=1e-4)},
        starts={"e5_all": dict(init="teacher", teacher=E5, layer_stride=1),
                "e5_every2": dict(init="teacher", teacher=E5, layer_stride=2),
                "minilm_all": dict(init="teacher", teacher=MINILM, layer_stride=1),
                "fresh": dict(init="fresh", layers=4)},
        trained=[["merge_distill", "e5_all"], ["plain_mlm", "e5_all"]],
        extra_trained=[["merge_distill", "e5_every2"]],
        student="merge_distill:e5_all",
        epochs=3, batch=32, lr=5e-5, alpha=0.5, top_k=8, eval_groups=7, seed=0, freeze_word_embeddings=True,
        probe=dict(pool_per_class=None, train_per_class=100, test_per_class=None, max_length=128, seeds=[0, 1, 2], l2=1e-3),
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
                     "eval": pool["test"][: cfg["eval_rows"]], "teacher": pool["train"][: teacher_rows(cfg, lang)]}
        if len(out[lang]["train"]) < cfg["train_rows"]:
            raise ValueError(f"Only {len(out[lang]['train'])} training rows for {lang!r}.")
    return out


def teacher_cfg(cfg: dict, name: str) -> dict:
    """``cfg`` with the teacher's own settings (``teacher_overrides[name]``) applied."""
    return {**cfg, **cfg.get("teacher_overrides", {}).get(name, {})}


def teacher_rows(cfg: dict, lang: str) -> int:
    """Training texts of ``lang`` its teacher's MLM head is trained on (a prefix of the train-hash rows; the
    students' ``train`` rows are the first ``train_rows`` of the same order)."""
    return teacher_cfg(cfg, cfg["languages"][lang])["teacher_rows"]


# ---------------------------------------------------------------------- 2. student tokenizer
def teacher_plan(cfg: dict) -> dict[str, list[str]]:
    """Teacher model -> its languages (from ``cfg['languages']``)."""
    plan: dict[str, list[str]] = {}
    for lang, model in cfg["languages"].items():
        plan.setdefault(model, []).append(lang)
    return plan


def teacher_tokenizers(cfg: dict) -> dict:
    return {name: AutoTokenizer.from_pretrained(resolve_model(name)) for name in teacher_plan(cfg)}


def build_vocabulary(cfg: dict, text, record: Record) -> tuple[StudentVocabulary, str]:
    """The student's tokenizer (the teacher tokenizer that reads all languages best) and each teacher's
    coverage by it (needs only the tokenizers, so it precedes teacher training)."""
    plan = teacher_plan(cfg)
    tokenizers = teacher_tokenizers(cfg)
    names = list(plan)
    train_texts = {lang: [r["text"] for r in text[lang]["train"][:200]] for lang in cfg["languages"]}
    best, table = choose_student_tokenizer([tokenizers[n] for n in names], train_texts, names)
    student_source = names[best]

    def counts(split: str) -> list[Counter]:
        return [count_tokens(tokenizers[name], [r["text"] for lang in plan[name] for r in text[lang][split]], cfg["max_length"])
                for name in names]

    vocabulary = StudentVocabulary.from_tokenizer(tokenizers[student_source], [tokenizers[n] for n in names], names,
                                                  counts("train"), min_coverage=0.5)
    if "vocabulary" not in record:
        record.put("vocabulary", {
            "student_tokenizer": student_source, "size": len(vocabulary), "choice_table": table,
            "teacher_vocab_sizes": {n: len(tokenizers[n]) for n in names},
            "coverage_train": vocabulary.coverage_table(),
            "coverage_eval": [c.as_dict() for c in vocabulary.update_coverage(counts("eval"))],
        })
    return vocabulary, student_source


# ---------------------------------------------------------------------- 3. teachers
def teacher_columns(tokenizer, texts, max_length: int) -> torch.Tensor:
    """The teacher's non-special token ids that occur in ``texts`` (its prediction candidates)."""
    counts = count_tokens(tokenizer, texts, max_length)
    specials = set(tokenizer.all_special_ids)
    return torch.tensor(sorted(i for i in counts if i not in specials), dtype=torch.long)


def _extended(mask: torch.Tensor) -> torch.Tensor:
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def train_teacher_head(model, tokenizer, texts, cfg: dict, columns: torch.Tensor, seed: int = 0) -> dict:
    """Continued MLM training of a sentence encoder without an MLM head.

    Trained: the head transform, the output bias and the top ``teacher_train_layers`` encoder layers; the
    decoder stays tied to the frozen input embeddings, the other layers are frozen. Each text is masked once
    (15%, 80/10/10, only tokens in ``columns``); the frozen bottom runs once and its output is cached; logits
    only over ``columns`` (the 250k-row output layer of e5 dominates the cost otherwise).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    model.requires_grad_(False)
    base, head = model.base_model, model.cls.predictions
    assert head.decoder.weight.data_ptr() == base.embeddings.word_embeddings.weight.data_ptr(), "decoder not tied"
    layers = base.encoder.layer
    top = cfg["teacher_train_layers"]
    bottom = len(layers) - top
    specials = set(tokenizer.all_special_ids)
    in_columns = torch.zeros(max(len(tokenizer), int(columns.max()) + 1), dtype=torch.bool)
    in_columns[columns] = True
    in_columns[sorted(specials)] = False
    inverse = torch.full((len(in_columns),), -1, dtype=torch.long)
    inverse[columns] = torch.arange(len(columns))
    replacements = torch.nonzero(in_columns).flatten()
    start = time.time()
    batches = []
    with torch.no_grad():
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for begin in range(0, len(order), cfg["teacher_batch"]):
            chunk = [texts[i] for i in order[begin : begin + cfg["teacher_batch"]]]
            enc = tokenizer(chunk, truncation=True, max_length=cfg["max_length"], padding=True, return_tensors="pt")
            ids, attention = enc["input_ids"], enc["attention_mask"]
            eligible = attention.bool() & in_columns[ids.clamp(max=len(in_columns) - 1)]
            masked, predict = mask_tokens(ids, eligible, tokenizer.mask_token_id, replacements, 0.15, generator)
            hidden = base(input_ids=masked, attention_mask=attention, output_hidden_states=True).hidden_states[bottom]
            batches.append((hidden, attention, predict, inverse[ids[predict]]))
    encode_seconds = time.time() - start
    with torch.no_grad():  # output bias := log unigram frequency of the candidates (predicting the frequent token is free)
        frequency = torch.ones(len(columns))
        for batch in batches:
            frequency += torch.bincount(batch[3], minlength=len(columns)).float()
        head.bias.fill_(float(torch.log(1.0 / frequency.sum())))  # tokens never seen in the text: an unseen token's
        head.bias[columns] = torch.log(frequency / frequency.sum()).to(head.bias.dtype)  # (add-one) frequency
    params = [*head.transform.parameters(), head.bias]
    for layer in layers[bottom:]:
        layer.requires_grad_(True)
        params += list(layer.parameters())
    head.transform.requires_grad_(True)
    head.bias.requires_grad_(True)
    head_params = [*head.transform.parameters(), head.bias]
    layer_params = [p for p in params if all(p is not q for q in head_params)]
    optimizer = torch.optim.AdamW([{"params": head_params, "lr": cfg["teacher_lr"]},
                                   {"params": layer_params, "lr": cfg.get("teacher_layer_lr", cfg["teacher_lr"])}], weight_decay=0.0)
    # every 10th batch is held out: the epoch with the lowest held-out loss is kept (each text is masked once,
    # so more epochs memorise those masks instead of learning to predict)
    held = batches[::10]
    batches = [b for i, b in enumerate(batches) if i % 10]
    total = cfg["teacher_epochs"] * len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, total // 10)) * max(0.0, 1 - step / total))

    def run(batch):
        hidden, attention, predict, target = batch
        h = hidden
        for layer in layers[bottom:]:
            out = layer(h, attention_mask=_extended(attention))
            h = out[0] if isinstance(out, tuple) else out
        logits = _restricted_head(model.cls, h[predict], columns).float()
        return torch.nn.functional.cross_entropy(logits, target, reduction="sum"), int((logits.argmax(-1) == target).sum()), len(target)

    def held_out():
        for layer in layers[bottom:]:
            layer.eval()
        with torch.no_grad():
            parts = [run(b) for b in held]
        for layer in layers[bottom:]:
            layer.train()
        n = sum(p[2] for p in parts)
        return round(float(sum(p[0] for p in parts)) / n, 4), round(sum(p[1] for p in parts) / n, 4)

    epoch_losses, held_losses = [], [held_out()]
    best = (held_losses[0][0], 0, {k: v.detach().clone() for k, v in model.state_dict().items() if "cls." in k or ".layer." in k})
    for layer in layers[bottom:]:
        layer.train()
    for epoch in range(cfg["teacher_epochs"]):
        losses = []
        for b in torch.randperm(len(batches), generator=generator).tolist():
            loss_sum, _, count = run(batches[b])
            loss = loss_sum / count
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        epoch_losses.append(round(sum(losses) / len(losses), 4))
        held_losses.append(held_out())
        if held_losses[-1][0] < best[0]:
            best = (held_losses[-1][0], epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items() if "cls." in k or ".layer." in k})
        elif epoch + 1 - best[1] >= 1:
            break
    model.load_state_dict(best[2], strict=False)
    model.eval()
    model.requires_grad_(False)
    return {"positions": int(sum(int(b[2].sum()) for b in batches)), "steps": total, "epoch_losses": epoch_losses,
            "held_out_loss_top1_by_epoch": held_losses, "kept_epoch": best[1],
            "encode_seconds": round(encode_seconds, 1), "seconds": round(time.time() - start, 1),
            "trained_layers": top, "candidates": len(columns),
            "trainable_params": sum(p.numel() for p in params)}


def most_frequent_baseline(tokenizer, train_texts, eval_texts, columns: torch.Tensor, max_length: int) -> dict:
    """Top-1 of always predicting the most frequent training token, on the held-out tokens in ``columns``."""
    train = count_tokens(tokenizer, train_texts, max_length)
    allowed = set(columns.tolist())
    top_id, _ = max(((i, c) for i, c in train.items() if i in allowed), key=lambda pair: pair[1])
    held = count_tokens(tokenizer, eval_texts, max_length)
    scored = sum(c for i, c in held.items() if i in allowed)
    return {"token": tokenizer.convert_ids_to_tokens(int(top_id)), "accuracy": held.get(top_id, 0) / max(1, scored)}


def build_teachers(cfg: dict, text, work: Path, record: Record) -> list[MaskedLMTeacher]:
    teachers = []
    for name, languages in teacher_plan(cfg).items():
        directory = work / "teachers" / name
        key = f"teacher_training:{name}"
        if key not in record or not (directory / "config.json").exists():
            source = resolve_model(name)
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForMaskedLM.from_pretrained(source)
            tcfg = teacher_cfg(cfg, name)
            texts = [r["text"] for lang in languages for r in text[lang]["teacher"][: tcfg["teacher_rows"]]]
            columns = teacher_columns(tokenizer, texts, cfg["max_length"])
            log(f"teacher {name}: MLM head training on {len(texts)} {'+'.join(languages)} texts, {len(columns)} candidates")
            stats = train_teacher_head(model, tokenizer, texts, tcfg, columns)
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            torch.save(columns, directory / "candidate_ids.pt")
            record.put(key, {"languages": languages, "texts": len(texts), **stats})
            log(f"teacher {name}: {record[key]}")
        teachers.append(MaskedLMTeacher(str(directory), languages=languages, name=name, max_length=cfg["max_length"]))
    return teachers


def teacher_mlm_quality(cfg: dict, text, teachers, work: Path, record: Record) -> None:
    """Every teacher on every language's held-out text: top-1 over its candidates vs the most-frequent-token baseline."""
    for teacher in teachers:
        columns = torch.load(work / "teachers" / teacher.name / "candidate_ids.pt")
        train_texts = [r["text"] for lang in teacher.languages for r in text[lang]["teacher"]]
        for lang in cfg["languages"]:
            key = f"teacher_mlm:{teacher.name}:{lang}"
            if key in record:
                continue
            texts = [r["text"] for r in text[lang]["eval"]]
            start = time.time()
            scores = score_teacher(teacher, texts, columns, cfg)
            baseline = most_frequent_baseline(teacher.tokenizer, train_texts, texts, columns, cfg["max_length"])
            record.put(key, {**scores, "most_frequent_token": baseline["token"], "most_frequent_accuracy": baseline["accuracy"],
                             "assigned": lang in teacher.languages, "seconds": round(time.time() - start, 1)})
            log(f"{key}: top-1 {scores['accuracy']:.3f} vs most-frequent {baseline['accuracy']:.3f}")


def score_teacher(teacher, texts, columns: torch.Tensor, cfg: dict) -> dict:
    """Masked-token top-1 of a teacher in its own tokenization, predicting among its ``columns``."""
    size = max(len(teacher.tokenizer), int(columns.max()) + 1)
    candidates = StudentVocabulary(tokens=[], teacher_names=[teacher.name], id_maps=[torch.full((size,), -1, dtype=torch.long)],
                                   coverage=[], special_ids={})
    candidates.id_maps[0][columns] = torch.arange(len(columns))
    return score_masked_lm(teacher.model, teacher, texts, vocabulary=candidates, teacher_index=0, candidates="student_vocabulary",
                           groups=cfg["eval_groups"], max_length=cfg["max_length"])


# ---------------------------------------------------------------------- 4. selection
def selection(cfg: dict, text, teachers, work: Path, record: Record) -> None:
    if "selection" in record:
        return
    start = time.time()
    saved = [list(t.languages) for t in teachers]
    candidates = {}
    for lang in cfg["languages"]:
        texts = [r["text"] for r in text[lang]["train"]]
        counts = [count_tokens(t.tokenizer, texts, cfg["max_length"]) for t in teachers]
        candidates[lang] = StudentVocabulary.union([t.tokenizer for t in teachers], [t.name for t in teachers], counts, 1)
    choice, rows = select_teachers(teachers, {lang: [r["text"] for r in text[lang]["select"]] for lang in cfg["languages"]},
                                   groups=cfg["eval_groups"], max_length=cfg["max_length"], candidates=candidates)
    for teacher, languages in zip(teachers, saved):
        teacher.languages = languages  # the run uses the given assignment; the table is reported
    record.put("selection", {"chosen": choice, "table": rows, "seconds": round(time.time() - start, 1)})
    log(f"selection: {choice}")


# ---------------------------------------------------------------------- 5. students
def student_dir(work: Path, name: str) -> Path:
    return work / "students" / name


def build_start(cfg: dict, start: str, vocabulary, teachers, seed: int):
    spec = cfg["starts"][start]
    if spec["init"] == "teacher":
        return build_student(vocabulary, teachers, init="teacher", init_teacher=spec["teacher"], layer_stride=spec["layer_stride"], seed=seed)
    return build_student(vocabulary, teachers, init="fresh", hidden_size=384, num_hidden_layers=spec["layers"], num_attention_heads=6,
                         intermediate_size=1536, max_position_embeddings=512, seed=seed)


def save_init_only(cfg: dict, start: str, vocabulary, teachers, work: Path, record: Record) -> Path:
    directory = student_dir(work, f"init_only:{start}")
    key = f"student:init_only:{start}"
    if key in record and (directory / "config.json").exists():
        return directory
    model = build_start(cfg, start, vocabulary, teachers, cfg["seed"])
    model.save_pretrained(directory)
    vocabulary.tokenizer.save_pretrained(directory)
    record.put(key, {"params": sum(p.numel() for p in model.parameters()), "init": getattr(model.config, "ki_student_init", None)})
    log(f"{key}: {record[key]}")
    return directory


def seeded(name: str, seed: int, cfg: dict) -> str:
    """A trained student's name with its training seed (``@seed<n>``) where that is not ``cfg['seed']``."""
    return name if seed == cfg["seed"] else f"{name}@seed{seed}"


def train_student(variant: str, start: str, cfg: dict, text, teachers, vocabulary, work: Path, record: Record,
                  seed: int | None = None) -> Path:
    seed = cfg["seed"] if seed is None else seed
    name = seeded(f"{variant}:{start}", seed, cfg)
    directory = student_dir(work, name)
    key = f"student:{name}"
    if key in record and (directory / "config.json").exists():
        return directory
    from datasets import Dataset

    distill = variant == "merge_distill"
    student = build_start(cfg, start, vocabulary, teachers, seed)
    rows = [r for lang in cfg["languages"] for r in text[lang]["train"]]
    random.Random(seed).shuffle(rows)
    rows = rows[: cfg.get("student_rows") or len(rows)]
    args = MergeDistillConfig(
        output_dir=str(directory), report_to="none", use_cpu=not torch.cuda.is_available(), seed=seed,
        alpha=cfg["alpha"] if distill else 0.0, top_k=cfg["top_k"], max_length=cfg.get("student_max_length", cfg["max_length"]),
        teacher_output="student_vocabulary", output_vocabulary="training_text",
        freeze_word_embeddings=cfg["freeze_word_embeddings"],
        signal_source="cached" if distill else "on_the_fly", static_masking=False,
        signal_cache_dir=str(work / "teacher_signals"), num_train_epochs=cfg["epochs"],
        per_device_train_batch_size=cfg["batch"], per_device_eval_batch_size=cfg["batch"], learning_rate=cfg["lr"],
        warmup_steps=max(1, len(rows) // cfg["batch"] // 10), weight_decay=0.01, logging_steps=10, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = MergeDistillTrainer(model=student, args=args, teachers=teachers, vocabulary=vocabulary,
                                  train_dataset=Dataset.from_list(rows))
    cache_seconds = None
    if distill:
        begin = time.time()
        trainer.precompute_teacher_signals()
        cache_seconds = round(time.time() - begin, 1)
        log(f"{name}: top-k cache ready in {cache_seconds}s ({trainer.signal_cache.nbytes() / 1e6:.1f} MB)")
    begin = time.time()
    trainer.train()
    seconds = round(time.time() - begin, 1)
    trainer.save_model()
    trainer.create_model_card()
    history = [h for h in trainer.state.log_history if "loss" in h]
    record.put(key, {"train_seconds": seconds, "cache_seconds": cache_seconds, "steps": trainer.state.global_step,
                     "rows": len(rows), "params": sum(p.numel() for p in student.parameters()),
                     "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
                     "output_columns": len(trainer.output_columns), "history": history,
                     "init": getattr(student.config, "ki_student_init", None)})
    log(f"{name}: trained in {seconds}s, {trainer.state.global_step} steps, last log {history[-1] if history else None}")
    return directory


def student_models(cfg: dict, extra: bool = False, primary_only: bool = False, seeds: bool = False) -> list[tuple[str, str]]:
    """(model name, kind) of every student row: trained students (``extra``: also ``extra_trained``, trained
    after the main results are written; ``seeds``: also the ``trained`` pairs with the other ``student_seeds``),
    then every start untrained."""
    trained = cfg["trained"] + (cfg.get("extra_trained", []) if extra else [])
    out = [(f"{variant}:{start}", "student" if variant == "merge_distill" else "baseline") for variant, start in trained]
    if seeds:
        out += [(seeded(f"{variant}:{start}", s, cfg), "student" if variant == "merge_distill" else "baseline")
                for s in cfg.get("student_seeds", []) for variant, start in cfg["trained"]]
    primary = cfg["student"].split(":", 1)[1]
    out += [(f"init_only:{start}", "init_only") for start in cfg["starts"] if start == primary or not primary_only]
    return out


# ---------------------------------------------------------------------- 6. masked LM and segmentation
def evaluate_students(cfg: dict, text, teachers, vocabulary, work: Path, record: Record, extra: bool = False,
                      primary_only: bool = False, seeds: bool = False) -> None:
    """Students AS SHIPPED: reloaded from their directory, reading held-out text with their saved tokenizer."""
    by_name = {t.name: t for t in teachers}
    trained_starts = {start for _, start in cfg["trained"] + cfg.get("extra_trained", [])}
    for name, _ in student_models(cfg, extra, primary_only, seeds):
        if name.startswith("init_only:") and name.split(":", 1)[1] not in trained_starts:
            continue  # an untrained start nobody trains: its probe row is enough
        directory = student_dir(work, name)
        shipped = None
        for lang, teacher_name in cfg["languages"].items():
            key = f"eval:{lang}:{name}"
            if key in record:
                continue
            if shipped is None:
                shipped = MaskedLMTeacher(str(directory), name=name)
            texts = [r["text"] for r in text[lang]["eval"]]
            begin = time.time()
            scores = score_masked_lm(shipped.model, shipped, texts, groups=cfg["eval_groups"], max_length=cfg["max_length"])
            agreement = segmentation_agreement(shipped.tokenizer, vocabulary.tokenizer, texts, by_name[teacher_name].tokenizer)
            record.put(key, {**scores, "segmentation": agreement, "seconds": round(time.time() - begin, 1)})
            log(f"{key}: top-1 {scores['accuracy']:.3f}, same segmentation {agreement['same_segmentation']:.4f}, "
                f"[UNK] words {agreement['unknown_words']}")


# ---------------------------------------------------------------------- 7. downstream: linear probe
def probe_rows(cfg: dict, lang: str):
    """(pool rows, test rows, label list) of debian_sections20 in ``lang``: the same for every model."""
    p = cfg["probe"]
    data = load_debian_sections(language=lang)
    labels = sorted(set(data["train"]["label"]))
    pool = cap_per_class(data["train"], p["pool_per_class"], seed=0)
    test = cap_per_class(data["test"], p["test_per_class"], seed=0)
    return pool, test, labels


def probe_models(cfg: dict, work: Path, extra: bool = False, primary_only: bool = False,
                 seeds: bool = False) -> list[tuple[str, str, str]]:
    """(model name, kind, directory): every teacher's ORIGINAL encoder, then every student."""
    out = [(f"teacher:{name}", "teacher", str(resolve_model(name))) for name in teacher_plan(cfg)]
    out += [(name, kind, str(student_dir(work, name))) for name, kind in student_models(cfg, extra, primary_only, seeds)]
    return out


def downstream_all(cfg: dict, work: Path, record: Record, extra: bool = False, primary_only: bool = False,
                   seeds: bool = False) -> None:
    p = cfg["probe"]
    transformers_logging.set_verbosity_error()
    features_dir = work / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    for lang in cfg["languages"]:
        pool, test, labels = probe_rows(cfg, lang)
        label_id = {label: i for i, label in enumerate(labels)}
        pool_y = [label_id[x] for x in pool["label"]]
        test_y = [label_id[x] for x in test["label"]]
        for name, kind, directory in probe_models(cfg, work, extra, primary_only, seeds):
            if all(f"probe:{lang}:{name}:{s}" in record for s in p["seeds"]):
                continue
            path = features_dir / f"{lang}--{name.replace(':', '--')}.pt"
            if path.exists():
                feats = torch.load(path)
            else:
                begin = time.time()
                feats = {"pool": mean_pooled_features(directory, pool["text"], max_length=p["max_length"]),
                         "test": mean_pooled_features(directory, test["text"], max_length=p["max_length"]),
                         "seconds": round(time.time() - begin, 1)}
                torch.save(feats, path)
            for seed in p["seeds"]:
                key = f"probe:{lang}:{name}:{seed}"
                if key in record:
                    continue
                rng = random.Random(f"probe-{seed}")
                by_label: dict[int, list[int]] = {}
                for i, y in enumerate(pool_y):
                    by_label.setdefault(y, []).append(i)
                rows = sorted(i for members in by_label.values() for i in rng.sample(members, min(p["train_per_class"], len(members))))
                result = linear_probe_accuracy(feats["pool"][rows], [pool_y[i] for i in rows], feats["test"], test_y,
                                               num_labels=len(labels), l2=p["l2"])
                record.put(key, {**result, "feature_seconds": feats["seconds"]})
                log(f"{key}: {result['accuracy']:.3f}")


# ---------------------------------------------------------------------- 8. results
def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def results_rows(cfg: dict, work: Path, record: Record) -> list[dict]:
    rows = []
    for lang, assigned_teacher in cfg["languages"].items():
        for name, kind, _ in probe_models(cfg, work, extra=True, seeds=True):
            runs = [record[f"probe:{lang}:{name}:{s}"]["accuracy"] for s in cfg["probe"]["seeds"] if f"probe:{lang}:{name}:{s}" in record]
            if not runs:
                continue
            mean, std = _mean_std(runs)
            if kind == "teacher":
                teacher = name.split(":", 1)[1]
                mlm = record.data.get(f"teacher_mlm:{teacher}:{lang}", {}).get("accuracy")
            else:
                mlm = record.data.get(f"eval:{lang}:{name}", {}).get("accuracy")
            row = {"language": lang, "model": name, "kind": kind, "downstream_accuracy": round(mean, 4),
                   "downstream_std": round(std, 4), "n_seeds": len(runs),
                   "masked_token_accuracy": None if mlm is None else round(mlm, 4)}
            if kind == "teacher":
                row["assigned"] = name == f"teacher:{assigned_teacher}"
            rows.append(row)
    return rows


def goal(cfg: dict, rows: list[dict]) -> dict:
    """The issue's goal: per language the merged student within 5 points of its teacher; its mean at least
    1 point above the best single teacher used for every language."""
    student = cfg["student"]
    acc = {(r["language"], r["model"]): r["downstream_accuracy"] for r in rows}
    langs = list(cfg["languages"])
    if any((lang, student) not in acc for lang in langs):
        return {}
    gaps = {lang: round(acc[(lang, student)] - acc[(lang, f"teacher:{cfg['languages'][lang]}")], 4) for lang in langs}
    means = {name: sum(acc[(lang, f"teacher:{name}")] for lang in langs) / len(langs) for name in teacher_plan(cfg)}
    best = max(means, key=means.get)
    student_mean = sum(acc[(lang, student)] for lang in langs) / len(langs)
    return {"student": student, "gap_to_own_teacher": gaps, "within_5_points": all(g >= -0.05 for g in gaps.values()),
            "student_mean": round(student_mean, 4), "teacher_means": {k: round(v, 4) for k, v in means.items()},
            "best_single_teacher": best, "margin_over_best_teacher": round(student_mean - means[best], 4),
            "mean_1_point_above_best": student_mean - means[best] >= 0.01}


def distillation_effect(cfg: dict, rows: list[dict]) -> dict:
    """Did distillation help? Per start trained both ways: per training seed and language, the merged student's
    probe accuracy minus plain MLM's (same start, text, steps), and both averaged over the training seeds."""
    acc = {(r["language"], r["model"]): r["downstream_accuracy"] for r in rows}
    langs = list(cfg["languages"])
    out = {}
    starts = [start for variant, start in cfg["trained"] + cfg.get("extra_trained", []) if variant == "merge_distill"]
    for start in starts:
        seeds = [cfg["seed"]] + (cfg.get("student_seeds", []) if ["merge_distill", start] in cfg["trained"] else [])
        pairs = {s: (seeded(f"merge_distill:{start}", s, cfg), seeded(f"plain_mlm:{start}", s, cfg)) for s in seeds}
        pairs = {s: p for s, p in pairs.items() if all((lang, m) in acc for lang in langs for m in p)}
        if not pairs:
            continue
        diff = {s: {lang: round(acc[(lang, kd)] - acc[(lang, plain)], 4) for lang in langs} for s, (kd, plain) in pairs.items()}

        def over_seeds(i: int) -> dict:
            values = {lang: [acc[(lang, p[i])] for p in pairs.values()] for lang in langs}
            means = {lang: round(sum(v) / len(v), 4) for lang, v in values.items()}
            return {**means, "mean": round(sum(means.values()) / len(langs), 4),
                    "std_over_training_seeds": {lang: round(_mean_std(v)[1], 4) for lang, v in values.items()}}

        init = {lang: acc.get((lang, f"init_only:{start}")) for lang in langs}
        out[start] = {"training_seeds": list(pairs), "kd_minus_plain": diff,
                      "kd_minus_plain_mean": {lang: round(sum(d[lang] for d in diff.values()) / len(diff), 4) for lang in langs},
                      "merge_distill": over_seeds(0), "plain_mlm": over_seeds(1), "init_only": init}
    return out


def tables(cfg: dict, work: Path, record: Record) -> str:
    rows = results_rows(cfg, work, record)
    lines = ["| language | model | kind | probe accuracy (mean ± std over seeds) | seeds | masked-token top-1 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kind = r["kind"] + (" (assigned)" if r.get("assigned") else "")
        mlm = "-" if r["masked_token_accuracy"] is None else f"{r['masked_token_accuracy']:.3f}"
        lines.append(f"| {r['language']} | {r['model']} | {kind} | {r['downstream_accuracy']:.3f} ± {r['downstream_std']:.3f} | "
                     f"{r['n_seeds']} | {mlm} |")
    lines += ["", "| teacher | language | masked-token top-1 | most-frequent-token baseline | scored tokens |", "|---|---|---|---|---|"]
    for key, value in record.data.items():
        if key.startswith("teacher_mlm:"):
            _, teacher, lang = key.split(":")
            lines.append(f"| {teacher} | {lang}{' (assigned)' if value['assigned'] else ''} | {value['accuracy']:.3f} | "
                         f"{value['most_frequent_accuracy']:.3f} (`{value['most_frequent_token']}`) | {value['tokens']} |")
    lines += ["", "| student | language | words | segmented as in training | [UNK] words (teacher had none) |", "|---|---|---|---|---|"]
    for key, value in record.data.items():
        if key.startswith("eval:") and "segmentation" in value:
            _, lang, name = key.split(":", 2)
            s = value["segmentation"]
            lines.append(f"| {name} | {lang} | {s['words']} | {s['same_segmentation']:.4f} | {s['unknown_words']} |")
    return "\n".join(lines)


def write_results(cfg: dict, work: Path, record: Record, path: Path) -> dict:
    rows = results_rows(cfg, work, record)
    settings = {k: v for k, v in cfg.items()}
    settings.update({"environment": record.data.get("environment"), "wall_seconds": record.data.get("wall_seconds_total"),
                     "first_started_at": record.data.get("first_started_at"), "finished_at": record.data.get("finished_at"),
                     "student_tokenizer": record.data.get("vocabulary", {}).get("student_tokenizer"),
                     "downstream_protocol": "linear probe (multinomial logistic regression, L-BFGS, L2) on frozen mean-pooled "
                     "last-layer features of debian_sections20 in each language; per seed train_per_class rows per class "
                     "drawn from a fixed pool; fixed test subset",
                     "masked_token_accuracy": "held-out DDTP text of the language (test-hash sources); teachers in their own "
                     "tokenization over their training-text tokens; students as shipped (reloaded with the saved tokenizer, "
                     "full output layer)"})
    payload = {"rows": rows, "goal": goal(cfg, rows), "distillation_vs_plain_mlm": distillation_effect(cfg, rows),
               "settings": settings}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    return payload


def card_results(cfg: dict, work: Path, record: Record, payload: dict) -> None:
    """The merged student's model card gets the measured tables (downstream, masked LM, segmentation)."""
    from ki_trainer.merge_distill.model_card import add_results_to_card

    directory = student_dir(work, cfg["student"])
    if not (directory / "README.md").exists():
        return
    g = payload.get("goal") or {}
    summary = ""
    if g:
        summary = (f"Linear probe on frozen mean-pooled features, debian_sections20 (20 classes), "
                   f"{cfg['probe']['train_per_class']} training rows per class, {len(cfg['probe']['seeds'])} seeds. "
                   f"This model's mean over {', '.join(cfg['languages'])}: {g['student_mean']:.3f}; best single teacher "
                   f"({g['best_single_teacher']}): {g['teacher_means'][g['best_single_teacher']]:.3f}; gap to each "
                   f"language's own teacher: " + ", ".join(f"{k} {v:+.3f}" for k, v in g["gap_to_own_teacher"].items()) + ".\n\n")
    add_results_to_card(str(directory), summary + tables(cfg, work, record)
                        + "\n\nProduced by `benchmarks/merge_distill.py --config " + record["config"]["name"]
                        + "` of ki-trainer (see docs/merge_distill.md there).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
    parser.add_argument("--work_dir", default=None, help="default: outputs/merge_distill/<config>")
    parser.add_argument("--results", default=None, help="where to write the results JSON (default: <work_dir>/merge_distill.json)")
    parser.add_argument("--no_extra", action="store_true", help="skip the extra_trained students")
    parser.add_argument("--stop_after", default=None, choices=["vocabulary", "teachers", "students", "evaluation"])
    cli = parser.parse_args()
    cfg = CONFIGS[cli.config]
    work = Path(cli.work_dir or f"outputs/merge_distill/{cli.config}")
    work.mkdir(parents=True, exist_ok=True)
    record = Record(work / "results.json")
    if "config" in record and record["config"] != {"name": cli.config, **json.loads(json.dumps(cfg))}:
        log(f"note: {work} was started with another configuration; finished stages are reused as recorded")
        record.put("config_history", record.data.get("config_history", []) + [record["config"]])
    record.put("config", {"name": cli.config, **cfg})
    record.put("environment", {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                               "processor": platform.processor(), "cuda": torch.cuda.is_available(), "cpus": os.cpu_count()})
    wall = time.time()
    if "first_started_at" not in record:
        record.put("first_started_at", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    torch.manual_seed(0)
    text = load_text(cfg)
    record.put("rows", {lang: {k: len(v) for k, v in parts.items()} for lang, parts in text.items()})
    vocabulary, student_source = build_vocabulary(cfg, text, record)
    log(f"student tokenizer: {student_source} ({len(vocabulary)} tokens)")
    if cli.stop_after == "vocabulary":
        return
    teachers = build_teachers(cfg, text, work, record)
    teacher_mlm_quality(cfg, text, teachers, work, record)
    if cli.stop_after == "teachers":
        return
    for start in cfg["starts"]:
        save_init_only(cfg, start, vocabulary, teachers, work, record)
    for variant, start in cfg["trained"]:
        train_student(variant, start, cfg, text, teachers, vocabulary, work, record)
    if cli.stop_after == "students":
        return
    evaluate_students(cfg, text, teachers, vocabulary, work, record, primary_only=True)
    if cli.stop_after == "evaluation":
        return
    del teachers
    downstream_all(cfg, work, record, primary_only=True)  # the rows the goal needs first, in every language
    write_results(cfg, work, record, Path(cli.results) if cli.results else work / "merge_distill.json")
    downstream_all(cfg, work, record)
    record.put("wall_seconds_last_invocation", round(time.time() - wall, 1))
    marked = time.time()
    record.put("wall_seconds_total", round(record.data.get("wall_seconds_total", 0) + marked - wall, 1))
    record.put("finished_at", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    payload = write_results(cfg, work, record, Path(cli.results) if cli.results else work / "merge_distill.json")
    text_tables = tables(cfg, work, record)
    (work / "table.md").write_text(text_tables + "\n")
    card_results(cfg, work, record, payload)
    print(text_tables)
    print(json.dumps(payload["goal"], indent=1))
    if cfg.get("extra_trained") and not cli.no_extra:
        teachers = build_teachers(cfg, text, work, record)
        for variant, start in cfg["extra_trained"]:
            train_student(variant, start, cfg, text, teachers, vocabulary, work, record)
        evaluate_students(cfg, text, teachers, vocabulary, work, record, extra=True)
        for seed in cfg.get("student_seeds", []):
            for variant, start in cfg["trained"]:
                train_student(variant, start, cfg, text, teachers, vocabulary, work, record, seed=seed)
        del teachers
        downstream_all(cfg, work, record, extra=True, seeds=True)
        write_results(cfg, work, record, Path(cli.results) if cli.results else work / "merge_distill.json")
        teachers = build_teachers(cfg, text, work, record)
        evaluate_students(cfg, text, teachers, vocabulary, work, record, extra=True, seeds=True)
        selection(cfg, text, teachers, work, record)  # a report only (the run keeps the given assignment): last
        record.put("wall_seconds_total", round(record.data.get("wall_seconds_total", 0) + time.time() - marked, 1))
        record.put("finished_at", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        payload = write_results(cfg, work, record, Path(cli.results) if cli.results else work / "merge_distill.json")
        text_tables = tables(cfg, work, record)
        (work / "table.md").write_text(text_tables + "\n")
        card_results(cfg, work, record, payload)
        print(text_tables)


if __name__ == "__main__":
    main()
