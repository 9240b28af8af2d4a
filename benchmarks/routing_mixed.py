"""Routing level on the mixed settings of docs/results.md: teachers of different architectures or languages.

Raw certainty compares teachers on one scale, which is what breaks when one teacher is an MPNet and the
other a MiniLM, or when one reads Italian and the other English. This script reuses the mixed settings
of ``benchmarks/quality.py --config mixed`` (same teachers, rows and lengths: 20 training and 20 test rows
per class, 48 tokens, MC K=8 in the top 2 layers) and evaluates every router at the routing level, as
``benchmarks/routing.py --level routing`` does for homogeneous teachers:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/routing_mixed.py \\
        --output_dir outputs/routing/results/mixed --settings heterogeneous cross-lingual-halves

Each setting: its teachers are trained (or reused) with quality.py's code, their signals on the unlabeled
pool (the setting's training rows in every transfer language, read WITHOUT labels) and on the test rows
(every transfer language) are cached with pooled features, then every router is fitted on the pool and
scored on the test rows. Writes ``DIR/results.json`` (``{"settings": {name: {"rows": [...], ...}}}``,
fractions in [0, 1]) and ``DIR/results.md``. Gold labels only score the routes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402
import quality  # noqa: E402
import routing  # noqa: E402

ROUTABLE = ("heterogeneous", "cross-lingual-halves")  # settings whose teachers own disjoint label blocks


def setting_signals(cfg: dict[str, Any], out: Path, name: str):
    """Train (or reuse) the setting's teachers; their cached signals on the pool and on the test rows."""
    from ki_trainer import KnowledgeIntegrationConfig, KnowledgeIntegrationTrainer
    from ki_trainer.pretrained import resolve_model

    setting = quality.settings_of(cfg)[name]
    for index in range(len(setting.teachers)):
        record = quality.job_teacher(cfg, out, name, 0, index)
        print(f"  teacher {index} ({quality.short(record['model'])}, {record['language']}): val accuracy "
              f"{record['val_accuracy']:.3f} ({'cached' if record['cached'] else 'trained'})", flush=True)
    labelled_pool = quality.transfer_set(cfg, setting, labeled=True)
    pool = labelled_pool.remove_columns("label")
    test = quality.transfer_set(cfg, setting, labeled=True, split=2)  # test rows in every transfer language
    args = KnowledgeIntegrationConfig(
        output_dir=str(out / "precompute" / name), signal_source="cached", router="prototype",  # caches features
        signal_cache_dir=str(quality.teacher_set_dir(out, name, 0) / "signal_cache"), max_length=cfg["max_length"],
        mc_samples=cfg["mc_samples"], mc_top_layers=cfg.get("mc_top_layers"), per_device_eval_batch_size=32,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=0,
    )
    trainer = KnowledgeIntegrationTrainer(
        model=str(resolve_model(setting.student)), args=args, teachers=quality.load_teachers(out, name, 0),
        train_dataset=pool,
    )
    pool_signals, test_signals = common.cached_pool_and_test(trainer, pool, test)
    blocks = [list(trainer.teachers[t].labels) for t in range(len(trainer.teachers))]
    return setting, pool_signals, test_signals, blocks, labelled_pool["label"], test["label"]


def markdown(results: dict[str, Any]) -> str:
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = []
    for name, block in results["settings"].items():
        lines += [f"### {name}: {block['describe']}", "",
                  f"{block['pool_rows']} pool rows (unlabeled), {block['test_rows']} test rows; {block['wall_seconds']} s.", "",
                  "| method | kind | test accuracy % | routing accuracy % (test) | routing % (pool) | fit s |",
                  "|---|---|---|---|---|---|"]
        for row in block["rows"]:
            lines.append(f"| {row['method']} | {row['kind']} | {pct(row['accuracy'])} | {pct(row.get('routing_accuracy'))} | "
                         f"{pct(row.get('pool_routing_accuracy'))} | {row.get('fit_seconds', '—')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--config", default="mixed", choices=["mixed", "mixed-smoke"])
    parser.add_argument("--settings", nargs="+", default=list(ROUTABLE), choices=list(ROUTABLE))
    parser.add_argument("--routers", nargs="+", default=routing.ROUTERS)
    parser.add_argument("--cache_root", default="outputs/routing/mixed", help="where teachers and signal caches are kept")
    args = parser.parse_args(argv)
    cfg = quality.CONFIGS[args.config]
    out_dir, root = Path(args.output_dir), Path(args.cache_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"settings": {}}
    for name in args.settings:
        start = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        setting, pool, test, blocks, pool_labels, labels = setting_signals(cfg, root / args.config, name)
        rows = routing.routing_rows(args.routers, cfg, pool, test, blocks, pool_labels, labels)
        results["settings"][name] = {
            "describe": setting.describe(), "rows": rows, "pool_rows": len(pool_labels), "test_rows": len(labels),
            "teacher_blocks": blocks, "wall_seconds": round(time.time() - start, 1),
        }
        results.update(config=args.config, settings_config={k: v for k, v in cfg.items() if k != "settings"},
                       machine=common.machine(),
                       command="python benchmarks/routing_mixed.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")  # after every setting: resumable
        (out_dir / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
