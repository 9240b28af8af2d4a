"""A look at what the merge did: which teacher the router chose for each label, how decided it was, and how the
student compares with the routed teacher ensemble it compresses.

:func:`routing_report` runs the trained student and the routed teachers once over a dataset (the test split, in
``ki-trainer integrate``) and returns a JSON-able summary; :func:`plot_routing_report` draws it as one PNG
(matplotlib, ``pip install matplotlib``). ``ki-trainer integrate`` writes ``routing_report.json`` and
``routing_report.png`` next to the model, and the model card shows the PNG; ``ki-trainer report OUTPUT_DIR``
redraws the PNG from the JSON.

Rows are grouped by their gold label where every row has one (gold labels serve this report only, as they serve
evaluation), else by the student's prediction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

REPORT_JSON = "routing_report.json"
REPORT_PNG = "routing_report.png"
MARGIN_BINS = 20


def routing_report(trainer, dataset) -> Optional[dict[str, Any]]:
    """Route every row of ``dataset`` as training did and summarise; ``None`` when the strategy has no router.

    Returns a dict with ``teachers``, ``labels`` (union order), ``grouped_by`` ("gold label" or "student
    prediction"), ``routed`` (``routed[label][teacher]``: rows of that label whose most competent teacher was
    ``teacher``), ``owners`` (the teachers that own each label), ``margins`` (histogram of the score margin between
    the two most competent teachers: ``edges``, ``counts``, ``median``) and, where gold labels exist,
    ``accuracy`` (student, routed teacher ensemble, routing = share of rows routed to an owner of their label).
    """
    import torch

    from .collator import EXAMPLE_IDS_KEY, TEACHER_INPUTS_KEY
    from .metrics import routed_teacher_predictions

    if trainer.router is None and getattr(trainer.strategy, "certainty_source", None) is None:
        return None
    trainer._fit_scoring()  # the router and certainty statistics are fitted in set-up, never while scoring rows
    space = trainer.label_space
    model = trainer.model
    was_training = model.training
    model.eval()
    chosen, margins, gold, predicted, routed = [], [], [], [], []
    try:
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader(dataset):
                inputs = dict(trainer._prepare_inputs(batch))
                teacher_batches = inputs.pop(TEACHER_INPUTS_KEY, {})
                ids = inputs.pop(EXAMPLE_IDS_KEY, None)
                labels = inputs.pop("labels", None)
                outputs = model(**inputs)
                logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
                signals = trainer.query_signals(inputs, teacher_batches, example_ids=ids)
                signals = trainer.normalize_certainty(trainer.route(signals))
                if signals.certainty is None:
                    return None
                scores = signals.certainty.float()
                chosen.append(scores.argmax(1).cpu())
                top = scores.topk(2, dim=1).values if scores.shape[1] > 1 else torch.cat([scores, scores], 1)
                margins.append((top[:, 0] - top[:, 1]).cpu())
                predicted.append(logits.argmax(-1).cpu())
                routed.append(routed_teacher_predictions(signals, space).cpu())
                gold.append(labels.cpu() if labels is not None else torch.full_like(predicted[-1], -100))
    finally:
        model.train(was_training)
    chosen_np, margin_np, gold_np, predicted_np, routed_np = (torch.cat(part).numpy() for part in (
        chosen, margins, gold, predicted, routed))
    labelled = gold_np >= 0
    by_gold = bool(labelled.all()) and len(gold_np) > 0
    groups = gold_np if by_gold else predicted_np
    ownership = space.ownership().numpy()  # [teachers, labels]
    counts = np.zeros((space.num_labels, space.num_teachers), dtype=int)
    np.add.at(counts, (groups, chosen_np), 1)
    edges = np.histogram_bin_edges(margin_np, bins=MARGIN_BINS) if len(margin_np) else np.zeros(MARGIN_BINS + 1)
    report: dict[str, Any] = {
        "rows": int(len(chosen_np)),
        "teachers": list(space.teacher_names),
        "labels": list(space.labels),
        "grouped_by": "gold label" if by_gold else "student prediction",
        "routed": {label: {teacher: int(counts[i, t]) for t, teacher in enumerate(space.teacher_names)}
                   for i, label in enumerate(space.labels)},
        "owners": {label: [space.teacher_names[t] for t in range(space.num_teachers) if ownership[t, i]]
                   for i, label in enumerate(space.labels)},
        "margins": {"edges": [float(e) for e in edges],
                    "counts": [int(c) for c in np.histogram(margin_np, bins=edges)[0]] if len(margin_np) else [],
                    "median": float(np.median(margin_np)) if len(margin_np) else None},
    }
    if labelled.any():
        g = gold_np[labelled]
        report["accuracy"] = {
            "student": float((predicted_np[labelled] == g).mean()),
            "routed teacher ensemble": float((routed_np[labelled] == g).mean()),
            "routing (to an owner of the gold label)": float(ownership[chosen_np[labelled], g].mean()),
            "labelled_rows": int(labelled.sum()),
        }
    return report


def plot_routing_report(report: dict[str, Any], path: Union[str, Path]) -> Path:
    """Draw ``report`` (from :func:`routing_report`) into a PNG at ``path``: routing per label, margins, accuracies."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("The routing report PNG needs matplotlib: pip install matplotlib "
                          "(routing_report.json holds the same numbers).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, teachers = report["labels"], report["teachers"]
    counts = np.array([[report["routed"][label][t] for t in teachers] for label in labels], dtype=float)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    has_accuracy = "accuracy" in report
    height = max(3.8, 0.28 * len(labels) + 1.6)
    fig, axes = plt.subplots(1, 3 if has_accuracy else 2, figsize=(15 if has_accuracy else 11, height),
                             gridspec_kw={"width_ratios": [2.2, 1, 1][: 3 if has_accuracy else 2]})
    ax = axes[0]
    colors = plt.get_cmap("tab10").colors
    left = np.zeros(len(labels))
    rows = np.arange(len(labels))[::-1]
    for t, teacher in enumerate(teachers):
        ax.barh(rows, shares[:, t], left=left, color=colors[t % 10], label=teacher)
        left += shares[:, t]
    names = [f"{label}  [{', '.join(report['owners'][label]) or 'no owner'}]  n={int(counts[i].sum())}"
             for i, label in enumerate(labels)]
    ax.set_yticks(rows, names, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of rows routed to each teacher (rows grouped by {report['grouped_by']}; [owner])")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(teachers), 5), fontsize=8, frameon=False)
    ax.set_title("Which teacher the router chose, per label", pad=22)
    ax = axes[1]
    margins = report["margins"]
    if margins["counts"]:
        edges = np.array(margins["edges"])
        ax.bar(edges[:-1], margins["counts"], width=np.diff(edges), align="edge", color="0.45")
        ax.axvline(margins["median"], color="C3", linestyle="--", label=f"median {margins['median']:.3g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("score margin: most competent minus second teacher")
    ax.set_ylabel("rows")
    ax.set_title("How decided the routing was")
    if has_accuracy:
        ax = axes[2]
        accuracy = {k: v for k, v in report["accuracy"].items() if k != "labelled_rows"}
        short = {"student": "student", "routed teacher ensemble": "routed\nteachers",
                 "routing (to an owner of the gold label)": "routing\n(to an owner)"}
        bars = ax.bar(range(len(accuracy)), list(accuracy.values()), color=["C0", "C2", "C1"][: len(accuracy)])
        ax.set_xticks(range(len(accuracy)), [short.get(k, k) for k in accuracy], fontsize=8)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"Accuracy on {report['accuracy']['labelled_rows']} labelled rows")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_routing_report(trainer, dataset, output_dir: Union[str, Path]) -> Optional[dict[str, Any]]:
    """:func:`routing_report` saved as ``routing_report.json`` and, with matplotlib, ``routing_report.png``."""
    report = routing_report(trainer, dataset)
    if report is None:
        return None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    try:
        plot_routing_report(report, output_dir / REPORT_PNG)
    except ImportError as error:
        from transformers.utils import logging

        logging.get_logger(__name__).warning(str(error))
    return report
