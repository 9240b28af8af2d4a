"""``ki-trainer report OUTPUT_DIR``: the routing report of an integrate run, as a table and a PNG.

``ki-trainer integrate`` writes ``routing_report.json`` (and, with matplotlib, ``routing_report.png``) to its
output_dir. This command prints the JSON as a short table (per label: rows, the teacher chosen most often and
its share, the owners) and draws the PNG again (e.g. after installing matplotlib).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"{report['rows']} rows, grouped by {report['grouped_by']}; teachers: {', '.join(report['teachers'])}",
             f"{'label':24s} {'rows':>5s}  {'routed most to':24s} {'share':>6s}  owners"]
    for label in report["labels"]:
        routed = report["routed"][label]
        total = sum(routed.values())
        top = max(routed, key=routed.get)
        share = routed[top] / total if total else float("nan")
        lines.append(f"{label:24s} {total:5d}  {top:24s} {share:6.1%}  {', '.join(report['owners'][label])}")
    if report["margins"]["median"] is not None:
        lines.append(f"median margin between the two most competent teachers: {report['margins']['median']:.4g}")
    for name, value in report.get("accuracy", {}).items():
        lines.append(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return lines


def main(argv: Optional[Sequence[str]] = None, prog: str = "ki-trainer report") -> Optional[Path]:
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..errors import UsageError
    from ..report import REPORT_JSON, REPORT_PNG, plot_routing_report

    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} OUTPUT_DIR\n\n{__doc__.strip()}")
        return None
    source = Path(argv[0]) / REPORT_JSON
    if not source.is_file():
        raise UsageError(f"{source} not found: give the output_dir of a `ki-trainer integrate` run (with a router, "
                         "and --routing_report true, the default).")
    report = json.loads(source.read_text(encoding="utf-8"))
    print("\n".join(summary_lines(report)))
    try:
        path = plot_routing_report(report, Path(argv[0]) / REPORT_PNG)
    except ImportError as error:
        raise UsageError(str(error)) from None
    print(f"\nwrote {path}")
    return path
