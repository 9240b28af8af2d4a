"""The ``ki-trainer`` console command (also ``python -m ki_trainer``).

Each subcommand is a module of this package with ``main(argv, prog)``; ``examples/*.py`` call the
same functions. The modules import the library (``ki_trainer.merge_distill`` ...), never the other way round.

Nothing here imports torch or transformers: ``ki-trainer --help``, ``--version`` and a mistyped command answer
at once; a subcommand's module is imported when it runs.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Optional, Sequence

DESCRIPTION = """\
ki-trainer: merge fine-tuned classifiers, each an expert on its own labels, domain or language, into
ONE student over the union of their labels, without human labels (knowledge integration, MUKI).

usage: ki-trainer COMMAND [RUN_FILE.yaml|.json] [--option VALUE ...]
       ki-trainer COMMAND --help     (--help-all lists every TrainingArguments option too)

commands:"""

EPILOG = """\
Several processes / GPUs:  accelerate launch --config_file "$(ki-trainer launch-config multi_gpu)" \\
                               -m ki_trainer integrate run.yaml
Documentation: docs/ (mkdocs site), README.md."""


def _command(module: str, summary: str) -> tuple[Callable[..., Any], str]:
    def run(argv: Sequence[str], prog: str) -> Any:
        return importlib.import_module(f"{__name__}.{module}").main(list(argv), prog=prog)

    return run, summary


def commands() -> dict[str, tuple[Optional[Callable[..., Any]], str]]:
    """Subcommand name -> (runner or None when unavailable, one-line summary)."""
    table: dict[str, tuple[Optional[Callable[..., Any]], str]] = {
        "integrate": _command("integrate", "merge teachers into one label-free student (run file or flags)"),
        "train-teachers": _command("train_teachers", "fine-tune one teacher per class subset of the embedded data"),
        "demo": _command("demo", "the main job end to end on a laptop CPU (two teachers -> one student)"),
        "launch-config": _command("launch_config", "list / print the path of a shipped accelerate config file"),
        "merge-distill": _command(
            "merge_distill", "merge masked-LM teachers (own vocabularies, own languages) into one multilingual student LM"
        ),
        "report": _command("report", "per-label routing, margins and accuracies of an integrate run (table + PNG)"),
        "env": _command("env", "versions, devices and accelerate config, to paste into a bug report"),
    }
    return table


def print_overview(stream=None) -> None:
    stream = stream or sys.stdout
    print(DESCRIPTION, file=stream)
    for name, (runner, summary) in commands().items():
        print(f"  {name:16s}{summary if runner is not None else '(' + summary + ')'}", file=stream)
    print("\n" + EPILOG, file=stream)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``ki-trainer`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_overview()
        return 0 if argv else 2
    if argv[0] in ("--version", "-V", "version"):
        from .._version import __version__

        print(f"ki-trainer {__version__}")
        return 0
    table = commands()
    name = argv[0]
    if name not in table:
        import difflib

        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"ki-trainer: unknown command {name!r}.{hint} Commands: {', '.join(table)}.", file=sys.stderr)
        return 2
    runner, summary = table[name]
    if runner is None:
        print(f"ki-trainer {name}: {summary}.", file=sys.stderr)
        return 2
    from ..errors import UsageError  # RunFileError (a run file's mistakes) is one too

    from ..launch import leave_process_group

    finished = False
    try:
        runner(argv[1:], f"ki-trainer {name}")
        finished = True
    except UsageError as error:  # the message says what to fix: no traceback
        print(f"ki-trainer {name}: {error}", file=sys.stderr)
        return 2
    finally:  # under `accelerate launch` / torchrun: every rank leaves the process group (barrier only after success)
        leave_process_group(synchronize=finished)
    return 0
