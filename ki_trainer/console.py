"""A quieter console: phase banners with timing, model loading without tables, progress in rows.

Used by the ``ki-trainer`` commands and by the trainer when it builds the student's new head.
"""

from __future__ import annotations

import contextlib
import logging as _logging
import re
import sys
import time
from typing import Any, Iterator, Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging

# modeling_utils: the load report; tensor_parallel: a TP-plan check that runs when modeling_utils is quiet.
_MODELING_LOGGERS = ("transformers.modeling_utils", "transformers.modeling_layers", "transformers.distributed.tensor_parallel")


@contextlib.contextmanager
def phase(title: str, stream=None, enabled: bool = True) -> Iterator[None]:
    """Print ``==> title`` before and ``==> title ... 45.2 s`` after a step of a job."""
    stream = stream or sys.stdout
    if enabled:
        print(f"==> {title}", file=stream, flush=True)
    start = time.perf_counter()
    yield
    if enabled:
        print(f"==> {title} ... {time.perf_counter() - start:.1f} s", file=stream, flush=True)


@contextlib.contextmanager
def quiet_model_loading() -> Iterator[None]:
    """Silence ``from_pretrained`` / ``save_pretrained`` progress bars and the load-report table; errors still raise.

    Callers that expect missing weights (a new classification head) should check
    ``output_loading_info`` themselves: see :func:`describe_new_head`.
    """
    bars_were_on = logging.is_progress_bar_enabled()
    loggers = [_logging.getLogger(name) for name in _MODELING_LOGGERS]
    levels = [lg.level for lg in loggers]
    logging.disable_progress_bar()
    for lg in loggers:
        lg.setLevel(_logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars_were_on:
            logging.enable_progress_bar()


def hide_progress_bars(hidden: bool) -> None:
    """With ``disable_tqdm``, hide the ``datasets`` map/filter bars and the ``transformers`` loading bars too."""
    if not hidden:
        return
    import datasets

    datasets.disable_progress_bars()
    logging.disable_progress_bar()


_HEAD_KEY = re.compile(r"(^|\.)(classifier|pre_classifier|score|pooler)\.")


def describe_new_head(loading_info: dict[str, Any], num_labels: int, source: str) -> tuple[str, list[str]]:
    """One log line for the expected new head, and the missing keys that are NOT part of a head.

    A sequence classifier built from an encoder checkpoint always misses its classifier (and often the
    pooler): that is expected and worth one line. Anything else missing means the checkpoint does not
    fit the architecture, and is returned so the caller can warn about it by name.
    """
    mismatched = {key[0] if isinstance(key, tuple) else key for key in loading_info.get("mismatched_keys", ())}
    missing = sorted(set(loading_info.get("missing_keys", ())) | mismatched)
    unexpected = [key for key in missing if not _HEAD_KEY.search(key)]
    head = [key for key in missing if _HEAD_KEY.search(key)]
    line = (f"Student from {source}: new classification head over {num_labels} labels "
            f"({len(head)} tensors newly initialised: {', '.join(head) or 'none'}).")
    return line, unexpected


class RowProgressCallback(ProgressCallback):
    """The Trainer's progress bar, counted in training rows (steps x rows per optimizer step) instead of steps."""

    def __init__(self, rows_per_step: int, max_str_len: int = 100) -> None:
        super().__init__(max_str_len=max_str_len)
        self.rows_per_step = max(int(rows_per_step), 1)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(total=state.max_steps * self.rows_per_step, unit="rows", dynamic_ncols=True)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.update((state.global_step - self.current_step) * self.rows_per_step)
            self.current_step = state.global_step


def use_row_progress(trainer: Any) -> Optional[TrainerCallback]:
    """Swap ``trainer``'s step progress bar for :class:`RowProgressCallback` (no-op when tqdm is disabled)."""
    if trainer.args.disable_tqdm:
        return None
    args = trainer.args
    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    trainer.remove_callback(ProgressCallback)
    callback = RowProgressCallback(rows_per_step)
    trainer.add_callback(callback)
    return callback
