"""Routing benchmark: which competence estimator ("router") picks the right teacher, and what students gain.

Any labelled JSON Lines file (plain or .xz) with ``text``, ``label`` and ``split`` (train/val/test;
other fields ignored) works; debian_sections20 is the default. The classes are carved among teachers by
a split spec (``2x10``: blocks by sorted label name; ``random:NxK`` with ``--split_seed``); the teachers
are trained once per split (``examples/train_teachers.py``) and cached, and so are their signals on the
pool (every training row, read WITHOUT labels) and on the test rows.

    # routing level: every router, from cached signals (cheap once the signals exist)
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/routing.py \\
        --split 2x10 --output_dir outputs/routing/results/2x10 --level routing
    # student level: oracle, vanilla KD, MUKI as published, and students trained with the given routers
    ... --level students --student_routers self_training knn_smoothing consensus --seeds 0 1 2
    # skewed pools: the pool subsampled so that the teachers own 50:50, 80:20, 95:5 of its rows (one run each)
    ... --level routing --pool_shares 0.5,0.5 0.8,0.2 0.95,0.05

Writes ``DIR/results.json`` (``{"rows": [{"method", "kind", "accuracy", "accuracy_std",
"routing_accuracy", "n_seeds", ...}], "settings": {...}}``, fractions in [0, 1]), ``DIR/results.md``
and ``DIR/results.png``; every finished student is recorded under ``DIR/records/`` so that an
interrupted run resumes. Gold labels are used only to REPORT: never in teacher signals on the pool,
router fitting, student training or choosing between routers at training time. The perfect-router
row (``kind: ceiling``) is the ensemble routed by the gold owner: an upper bound that uses labels; the
supervised-router row (also ``kind: ceiling``) is the self-training head fitted on the gold owners of every
pool row: how well the teachers' signals can route at all; the majority-teacher row (``kind: baseline``) routes
every row to the teacher owning most pool rows: on a skewed pool, the bar a router must clear.

``--pool_shares 0.9,0.1`` builds the pool by subsampling each teacher's training rows (by GOLD owner, used only to
build the pool; seeded by ``--pool_seed``) so that teacher t owns share t of it; the test rows are unchanged. Each
share spec writes ``DIR/shares-0.9-0.1/results.json`` (with ``pool_owner_counts``; every pool router's row carries
its label-free ``estimated_shares``), and all of them ``DIR/skew.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402
import routing_eval  # noqa: E402

from ki_trainer.config import STUDENT_INITS  # noqa: E402
from ki_trainer.routing import get_router  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    # Fits a 2-core CPU: ~1 hour for the signals plus the student level with cached signals (docs/routing.md).
    "cpu": dict(model="sentence-transformers/paraphrase-MiniLM-L3-v2", max_length=48, epochs=3, batch_size=32,
                learning_rate=1e-4, mc_samples=8, mc_top_layers=1),
    # The H100/H200 configuration of issue 9 (all-MiniLM-L6-v2, 128 tokens, 4 epochs).
    "gpu": dict(model="sentence-transformers/all-MiniLM-L6-v2", max_length=128, epochs=4, batch_size=32,
                learning_rate=5e-5, mc_samples=16, mc_top_layers=None),
}
ROUTERS = ["max_prob", "energy", "entropy", "mc_entropy", "mc_mutual_information", "mc_variance", "standardized",
           "prototype", "relative_mahalanobis", "consensus", "knn_smoothing", "self_training"]
PUBLISHED = "mc_entropy"
# 'muki:ROUTER[key=value]' keys that are KnowledgeIntegrationConfig fields (the others are router_options).
CONFIG_KEYS = ("share_weighting", "within_teacher_kd")


def signals_for(args, cfg) -> tuple[Any, Any, Any, list[list[str]]]:
    """Teachers (trained or reused) and their cached signals on the pool and the test rows."""
    data = common.load_labelled(args.data)
    root = Path(args.cache_root)
    slug = common.split_slug(args.split, args.split_seed)
    teacher_dir = root / "teachers" / common.data_name(args.data) / slug
    summary = common.train_teacher_set(
        args.data, args.split, teacher_dir, cfg["model"], cfg["max_length"], cfg["epochs"], cfg["batch_size"],
        cfg["learning_rate"], seed=0, split_seed=args.split_seed,
    )
    pool = data["train"].remove_columns([c for c in ("label", "split") if c in data["train"].column_names])
    trainer = common.ki_trainer_for(
        teacher_dir, cfg["model"], Path(args.output_dir) / "precompute", root / "cache" / common.data_name(args.data) / slug,
        cfg["max_length"], cfg["mc_samples"], cfg["mc_top_layers"], pool, router="prototype",
    )
    pool_signals, test_signals = common.cached_pool_and_test(trainer, pool, data["test"])
    blocks = [record["labels"] for record in summary["teachers"]]
    return data, pool_signals, test_signals, blocks


def routing_rows(routers, cfg, pool_signals, test_signals, blocks, pool_labels, test_labels,
                 compare_equal_shares: bool = False, compare_given_shares: bool = False) -> list[dict[str, Any]]:
    """Teachers, the three labelled references (perfect router, supervised router, majority teacher) and every router
    (fitted on the pool, label-free) on the pool and the test rows; with ``compare_equal_shares`` every pool router
    also with ``shares="equal"`` (the pool z-scores without a share estimate), as ``ROUTER[shares=equal]``; with
    ``compare_given_shares`` also with the pool's owner shares given (``ROUTER[shares=given]``: a user who knows how
    many rows of each teacher's domain went into the pool; the gold owners are counted, never passed per row)."""
    rows = routing_eval.teacher_rows(test_signals, blocks, test_labels)
    rows.append(routing_eval.ceiling(pool_signals, test_signals, blocks, pool_labels, test_labels))
    rows.append(routing_eval.supervised_bound(pool_signals, test_signals, blocks, pool_labels, test_labels))
    rows.append(routing_eval.majority_baseline(pool_signals, test_signals, blocks, pool_labels, test_labels))
    runs = [(name, None) for name in routers]
    pool_routers = [name for name in routers if "shares" in get_router(name).defaults]
    if compare_equal_shares:
        runs += [(name, {"shares": "equal"}) for name in pool_routers]
    if compare_given_shares:
        given = pool_owner_shares(pool_labels, blocks)
        runs += [(name, {"shares": given}) for name in pool_routers]
    for router, options in runs:
        name = router + ("" if not options else "[shares=equal]" if options["shares"] == "equal" else "[shares=given]")
        record = routing_eval.evaluate_router(
            router, options, pool_signals, test_signals, blocks, pool_labels, test_labels,
            cfg["mc_samples"], cfg.get("mc_top_layers"),
        )
        record["method"] = f"ensemble routed by {name}" + (" (MUKI as published)" if name == PUBLISHED else "")
        record["router"] = name
        rows.append(record)
        print(f"  {name:24s} routing {record['routing_accuracy']:.3f} (pool {record['pool_routing_accuracy']:.3f}) "
              f"ensemble {record['accuracy']:.3f}  fit {record['fit_seconds']} s"
              + (f"  shares {record['estimated_shares']}" if record.get("estimated_shares") else ""), flush=True)
    return rows


@torch.no_grad()
def test_accuracy(model, tokenizer, texts, gold_ids, max_length: int, return_correct: bool = False):
    model.eval()
    device = next(model.parameters()).device
    predicted = []
    for start in range(0, len(texts), 64):
        batch = tokenizer(texts[start : start + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        predicted.append(model(**batch.to(device)).logits.argmax(-1).cpu())
    correct = torch.cat(predicted).numpy() == np.asarray(gold_ids)
    return (float(correct.mean()), correct) if return_correct else float(correct.mean())


def parse_method(method: str) -> tuple[str, Optional[str], str]:
    """'muki:ROUTER@INIT' / 'vanilla_kd' / 'oracle' -> (method without the init, router or None, init or '')."""
    base, _, init = method.partition("@")
    return base, (base.split(":", 1)[1] if base.startswith("muki:") else None), init


def student_job(args, cfg, data, blocks, method: str, seed: int, out: Optional[Path] = None) -> dict[str, Any]:
    """One student (or the oracle) trained on the pool, evaluated by a plain forward pass on the test rows."""
    from transformers import set_seed

    union = [label for block in blocks for label in block]
    gold = [union.index(label) for label in data["test"]["label"]]
    root = Path(args.cache_root)
    slug = common.split_slug(args.split, args.split_seed)
    teacher_dir = root / "teachers" / common.data_name(args.data) / slug
    run_dir = Path(out or args.output_dir) / "runs" / f"{method}-seed{seed}"
    start = time.perf_counter()
    if method == "oracle":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

        from ki_trainer.pretrained import resolve_model

        module = common.load_train_teachers_module()
        path = str(resolve_model(cfg["model"]))
        tokenizer = AutoTokenizer.from_pretrained(path)
        splits = module.datasets.DatasetDict({"train": data["train"], "val": data["val"]})
        encoded = module.encode(splits, tokenizer, union, cfg["max_length"])
        set_seed(seed)
        id2label = dict(enumerate(union))
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(union), id2label=id2label, label2id={v: k for k, v in id2label.items()},
            ignore_mismatched_sizes=True,
        )
        cuda = torch.cuda.is_available()
        training = TrainingArguments(
            output_dir=str(run_dir), num_train_epochs=cfg["epochs"], per_device_train_batch_size=cfg["batch_size"],
            learning_rate=cfg["learning_rate"], seed=seed, data_seed=seed, save_strategy="no", eval_strategy="no",
            logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not cuda,
            bf16=cuda and torch.cuda.is_bf16_supported(),
        )
        Trainer(model=model, args=training, train_dataset=encoded["train"], processing_class=tokenizer).train()
    else:
        pool = data["train"].remove_columns([c for c in ("label", "split") if c in data["train"].column_names])
        base, router, init = parse_method(method)
        if base == "vanilla_kd":
            config = dict(strategy="vanilla_kd")
        else:
            config = dict(strategy="muki", router=router)  # named explicitly: the cached default is not MUKI's
            if "[" in router:  # 'ROUTER[key=value]' (e.g. relative_mahalanobis[shares=equal]): router_options,
                name, _, options = router.partition("[")  # except share_weighting (a config field)
                config["router"] = name
                options = dict(item.split("=", 1) for item in options.rstrip("]").split(","))
                config.update({key: options.pop(key) for key in CONFIG_KEYS if key in options})
                if "within_teacher_kd" in config:
                    config["within_teacher_kd"] = float(config["within_teacher_kd"])
                if options.get("shares") == "given":  # the pool's owner shares, as a user who built it knows them
                    options["shares"] = pool_owner_shares(data["train"]["label"], blocks)
                if options:
                    config["router_options"] = options
        if router == "gold_owner":  # USES LABELS: every pool row's targets from its gold owner (a ceiling)
            from ki_trainer.routing import ROUTERS, register_router

            if "gold_owner" not in ROUTERS:
                register_router(routing_eval.GoldOwnerRouter)
            run_dir.mkdir(parents=True, exist_ok=True)
            full, pool_signals, _, _ = signals_for(args, cfg)  # the whole pool: a --pool_shares pool is a subset of it
            table = routing_eval.gold_owner_table(pool_signals, full["train"]["label"], blocks, run_dir / "gold.pt")
            config.update(router_options={"table": table}, selection="hard")
        config["student_init"] = init or "pretrained"
        set_seed(seed)  # the trainer builds the student's new head before Trainer seeds anything
        trainer = common.ki_trainer_for(
            teacher_dir, cfg["model"], run_dir, root / "cache" / common.data_name(args.data) / slug,
            cfg["max_length"], cfg["mc_samples"], cfg["mc_top_layers"], pool, seed=seed,
            num_train_epochs=cfg["epochs"], per_device_train_batch_size=cfg["batch_size"],
            learning_rate=cfg["learning_rate"], **config,
        )
        trainer.train()
        model, tokenizer = trainer.model, trainer.processing_class
    accuracy, correct = test_accuracy(model, tokenizer, data["test"]["text"], gold, cfg["max_length"], return_correct=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    record = {"method": method, "seed": seed, "accuracy": accuracy, "train_seconds": round(time.perf_counter() - start, 1)}
    # Per owner of the gold class (USES LABELS, to report only): the test accuracy of a test set mixed like the pool
    # is sum_t share_t * accuracy on teacher t's test rows.
    owners, _ = routing_eval.owners_and_gold(data["test"]["label"], blocks)
    record["accuracy_by_owner"] = [float(correct[owners == t].mean()) for t in range(len(blocks))]
    pool_owners, _ = routing_eval.owners_and_gold(data["train"]["label"], blocks)
    shares = np.bincount(pool_owners, minlength=len(blocks)) / len(pool_owners)
    record["pool_mix_accuracy"] = float(np.dot(shares, record["accuracy_by_owner"]))
    return record


def student_level(args, cfg, data, blocks, routing_rows, out: Optional[Path] = None) -> list[dict[str, Any]]:
    shown = ["oracle", "vanilla_kd", f"muki:{PUBLISHED}"] + [f"muki:{name}" for name in args.student_routers]
    # Computed in this order (the oracle, the first router and the two baselines first, so that an interrupted CPU
    # run has the comparison that matters most); reported in `shown` order.
    routers = [f"muki:{name}" for name in args.student_routers]
    order = ["oracle"] + routers[:1] + [f"muki:{PUBLISHED}", "vanilla_kd"] + routers[1:]
    for init in args.student_inits:  # the same students again, started from the teachers' weights
        extra = [f"{method}@{init}" for method in [f"muki:{PUBLISHED}"] + routers]
        shown += extra
        order += extra
    records_dir = Path(out or args.output_dir) / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    routing_of = {row.get("router"): row for row in routing_rows}
    rows = []
    for method in order:
        results = []
        for seed in args.seeds:
            file = records_dir / f"{method.replace(':', '-')}-seed{seed}.json"
            if file.is_file():
                results.append(json.loads(file.read_text()))
                continue
            if args.records_only or (args.only and method not in args.only):
                continue
            result = student_job(args, cfg, data, blocks, method, seed, out)
            file.write_text(json.dumps(result, indent=2) + "\n")
            print(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed}: {result['accuracy']:.4f} "
                  f"(per owner {result['accuracy_by_owner']}, at the pool's mix {result['pool_mix_accuracy']:.4f}; "
                  f"{result['train_seconds']} s)", flush=True)
            results.append(result)
        if not results:
            continue
        accuracies = np.array([r["accuracy"] for r in results])
        base, router, init = parse_method(method)
        name = {"oracle": "oracle (student trained WITH all labels)", "vanilla_kd": "student: vanilla KD"}.get(
            base, f"student: MUKI + {router}" + (" (as published)" if router == PUBLISHED and not init else "")
            + (" (USES LABELS: every pool row routed to its gold owner, a ceiling)" if router == "gold_owner" else ""))
        name += f", student_init={init}" if init else ""
        rows.append({
            "method": name, "router": router,
            "kind": "oracle" if method == "oracle" else "ceiling" if router == "gold_owner" else "student",
            "accuracy": float(accuracies.mean()), "accuracy_std": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else 0.0,
            "student_init": init or "pretrained",
            "routing_accuracy": routing_of.get(router, {}).get("routing_accuracy") if router else None,
            "n_seeds": len(results), "seeds": [r["seed"] for r in results],
            "train_seconds": float(np.mean([r["train_seconds"] for r in results])),
            "_method": method,
        })
    rows.sort(key=lambda row: shown.index(row.pop("_method")))
    return rows


def markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    lines = [f"Data {settings['data']}, teachers {settings['split']}, {settings['config']} configuration "
             f"({settings['model']}, {settings['max_length']} tokens, MC K={settings['mc_samples']}, "
             f"top layers {settings['mc_top_layers']}); {settings['test_rows']} test rows, {settings['pool_rows']} pool rows.",
             "", "| method | kind | test accuracy % | routing accuracy % (test) | routing % (pool) | seeds | fit s | passes/example |",
             "|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for row in rows:
        acc = pct(row["accuracy"]) + (f" ± {100 * row['accuracy_std']:.1f}" if row.get("n_seeds", 1) > 1 else "")
        lines.append(f"| {row['method']} | {row['kind']} | {acc} | {pct(row.get('routing_accuracy'))} | "
                     f"{pct(row.get('pool_routing_accuracy'))} | {row.get('n_seeds', 1)} | {row.get('fit_seconds', '—')} | "
                     f"{row.get('forward_passes_per_example', '—')} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["kind"] != "teacher"]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(shown) + 1.5))
    colors = {"ceiling": "#bbbbbb", "baseline": "#dddddd", "oracle": "#444444", "router": "#8da0cb",
              "student": "#66c2a5"}
    y = np.arange(len(shown))[::-1]
    means = [100 * r["accuracy"] for r in shown]
    ax.barh(y, means, xerr=[100 * r.get("accuracy_std", 0.0) for r in shown], color=[colors[r["kind"]] for r in shown], capsize=3)
    for yi, m in zip(y, means):
        ax.text(m + 0.5, yi, f"{m:.1f}", va="center", fontsize=8)
    ax.set_yticks(y, [r["method"] for r in shown], fontsize=8)
    oracle = next((100 * r["accuracy"] for r in shown if r["kind"] == "oracle"), None)
    if oracle is not None:
        ax.axvline(oracle, color="#444444", linestyle="--", linewidth=1)
    ax.set_xlim(0, 100)
    ax.set_xlabel("test accuracy % (routed ensemble for routers; students mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pool_owner_shares(pool_labels, blocks) -> list[float]:
    """The pool's share of rows per teacher (USES LABELS, counted over the whole pool: what a user who assembled the pool
    from each teacher's domain knows; a router given it never sees a row's owner)."""
    owners, _ = routing_eval.owners_and_gold(pool_labels, blocks)
    return (np.bincount(owners, minlength=len(blocks)) / len(owners)).round(4).tolist()


def parse_shares(text: str) -> list[float]:
    """'0.9,0.1' -> [0.9, 0.1] (validated against the teachers later)."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pool_shares {text!r}: give one share per teacher, e.g. 0.9,0.1") from None


def shares_slug(shares: list[float]) -> str:
    return "shares-" + "-".join(f"{v:g}" for v in shares)


def run_level(args, cfg, data, pool_signals, test_signals, blocks, out: Path, start: float,
              shares: Optional[list[float]] = None) -> dict[str, Any]:
    """The routing level (and the students) on the pool as given, or subsampled to ``shares`` by gold owner."""
    out.mkdir(parents=True, exist_ok=True)
    pool_labels = data["train"]["label"]
    extra: dict[str, Any] = {}
    if shares is not None:
        index = routing_eval.subsample_to_shares(pool_labels, blocks, shares, args.pool_seed)
        pool_signals = routing_eval.select_rows(pool_signals, index)
        data = {**data, "train": data["train"].select(index.tolist())}
        pool_labels = data["train"]["label"]
        owners, _ = routing_eval.owners_and_gold(pool_labels, blocks)
        counts = np.bincount(owners, minlength=len(blocks))
        extra = {"pool_shares": shares, "pool_seed": args.pool_seed, "pool_owner_counts": counts.tolist()}
        print(f"[{time.strftime('%H:%M:%S')}] pool subsampled to shares {shares} by gold owner (to BUILD the pool "
              f"only): {counts.tolist()} rows", flush=True)
    rows = routing_rows(args.routers, cfg, pool_signals, test_signals, blocks, pool_labels, data["test"]["label"],
                        args.compare_equal_shares, args.compare_given_shares)
    if args.level == "students":
        rows += student_level(args, cfg, data, blocks, rows, out)
    settings = {"data": common.data_name(args.data), "split": args.split, "split_seed": args.split_seed,
                "config": args.config, **cfg, "pool_rows": len(data["train"]), "test_rows": len(data["test"]),
                "teacher_blocks": blocks, "level": args.level, "seeds": args.seeds, **extra,
                "machine": common.machine(), "wall_seconds": round(time.time() - start, 1),
                "command": "python benchmarks/routing.py " + " ".join(args.argv)}
    result = {"rows": rows, "settings": settings}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(rows, settings))
    chart(rows, out / "results.png", f"{settings['data']} {args.split}: routers (routed ensemble) and students")
    print(markdown(rows, settings), flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="labelled JSON Lines file (default: the embedded debian_sections20)")
    parser.add_argument("--split", default="2x10", help="teacher label split: NxK, random:NxK or a JSON list of lists")
    parser.add_argument("--split_seed", type=int, default=0, help="seed of random: splits")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--level", choices=["routing", "students"], default="routing")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu" if not torch.cuda.is_available() else "gpu")
    parser.add_argument("--routers", nargs="+", default=ROUTERS)
    parser.add_argument("--student_routers", nargs="*", default=["self_training", "knn_smoothing", "consensus"])
    parser.add_argument("--student_inits", nargs="*", default=[], choices=[i for i in STUDENT_INITS if i != "pretrained"],
                        help="students: also train MUKI as published and each --student_routers student with this "
                             "student_init (reported as 'muki:ROUTER@INIT')")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--records_only", action="store_true",
                        help="students: report only the (method, seed) runs already recorded under DIR/records; train none")
    parser.add_argument("--only", nargs="*", default=None,
                        help="students: train only these methods (oracle, vanilla_kd, muki:ROUTER), e.g. to split the "
                             "work between processes sharing DIR/records; the others are reported from their records")
    parser.add_argument("--pool_shares", nargs="*", type=parse_shares, default=None,
                        help="subsample the pool so that teacher t owns share t of its rows, e.g. 0.9,0.1 (several: one "
                             "run each, in DIR/shares-0.9-0.1/ ...). The GOLD owner is used only to build the pool; the "
                             "routers never see it; the test rows are unchanged")
    parser.add_argument("--pool_seed", type=int, default=0, help="seed of the --pool_shares subsample")
    parser.add_argument("--compare_equal_shares", action="store_true",
                        help="also report every pool router with shares='equal' (no share estimate) as ROUTER[shares=equal]")
    parser.add_argument("--compare_given_shares", action="store_true",
                        help="also report every pool router given the pool's owner shares (router_options shares=[...], "
                             "what a user who assembled the pool knows; counted from the gold owners of the whole pool, "
                             "never per row) as ROUTER[shares=given]")
    parser.add_argument("--cache_root", default="outputs/routing", help="where teachers and signal caches are kept")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    cfg = CONFIGS[args.config]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data, pool_signals, test_signals, blocks = signals_for(args, cfg)
    print(f"[{time.strftime('%H:%M:%S')}] teachers and signals ready ({time.time() - start:.0f} s)", flush=True)
    if not args.pool_shares:
        return run_level(args, cfg, data, pool_signals, test_signals, blocks, out, start)
    results = {}
    for shares in args.pool_shares:
        results[shares_slug(shares)] = run_level(args, cfg, data, pool_signals, test_signals, blocks,
                                                 out / shares_slug(shares), start, shares)
    (out / "skew.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
