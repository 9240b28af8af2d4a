"""Launch footguns caught early: processes that do not form one run, and two runs sharing an output dir.

Two mistakes train silently wrong today:

* ``accelerate launch --multi_gpu --num_processes 2`` (or ``torchrun``) on a machine without GPUs
  starts two processes, but ``TrainingArguments`` only joins them into one DDP run when it is told to
  use the CPU (``use_cpu=True``): otherwise each process trains its own copy and all of them write the
  same output directory. :func:`check_launch` raises :class:`LaunchError` when the launcher's
  ``WORLD_SIZE`` disagrees with the Trainer's ``world_size``.
* ``accelerate launch --cpu --num_processes 2`` runs ONE process (more CPU processes need ``mpirun``):
  :func:`check_launch` warns.

:func:`output_dir_lock` refuses a second run that writes the same output directory while the first
is alive (a lock file holding host and pid; a lock left by a dead process is taken over).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from typing import Iterator, Optional

LOCK_NAME = "_ki_trainer.lock"  # "_*" files are never pushed to the Hub by the Trainer
_MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")
_TRUE = {"1", "true", "yes", "on"}


class LaunchError(RuntimeError):
    """The processes of this launch do not form the run that was asked for."""


def launcher_world_size() -> Optional[int]:
    """The number of processes the launcher (torchrun / accelerate launch) started, if it said so."""
    value = os.environ.get("WORLD_SIZE")
    if value is None or ("RANK" not in os.environ and "LOCAL_RANK" not in os.environ):
        return None
    try:
        return int(value)
    except ValueError:
        return None


def check_launch(args) -> None:
    """Raise :class:`LaunchError` if the launcher's processes would train independently; warn on a lost launch.

    Args:
        args: the run's ``TrainingArguments`` (after ``__post_init__``, so ``world_size`` is known).
    """
    launched = launcher_world_size()
    world_size = int(getattr(args, "world_size", 1))
    if launched is not None and launched > 1 and world_size != launched:
        rank = os.environ.get("RANK", "?")
        hint = (
            " On a machine without GPUs pass --use_cpu true (use_cpu=True): without it transformers does not join "
            "the processes into one DDP run."
            if not getattr(args, "use_cpu", False)
            else ""
        )
        raise LaunchError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}, this is RANK {rank}), but the Trainer "
            f"runs with world_size={world_size}: each process would train its own copy and all of them would write "
            f"{getattr(args, 'output_dir', None)!r}.{hint}"
        )
    cpu_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE
    mpi = any(name in os.environ for name in _MPI_SIZE_VARIABLES)
    if cpu_launch and "MASTER_ADDR" in os.environ and launched is None and not mpi:
        warnings.warn(
            "`accelerate launch --cpu --num_processes N` started ONE process (several CPU processes need mpirun). "
            "For N processes on CPU use `accelerate launch --multi_gpu --num_processes N ... --use_cpu true` or "
            "`torchrun --nproc_per_node N ... --use_cpu true`; this run continues as a single process.",
            stacklevel=2,
        )


def check_distributed_type(args, accelerator) -> None:
    """Warn when the launch asked for FSDP or DeepSpeed but Accelerate set up something else.

    Accelerate shards with FSDP only across accelerators (GPUs, NPUs, ...): launched on CPU processes
    with an FSDP config it runs plain DDP, every process holding the whole student.
    """
    requested = []
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE or getattr(args, "fsdp", None):
        requested.append("FSDP")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE or getattr(args, "deepspeed", None):
        requested.append("DEEPSPEED")
    actual = str(getattr(getattr(accelerator, "distributed_type", None), "value", "NO")).upper()
    for kind in requested:
        if actual != kind:
            warnings.warn(
                f"{kind} was requested but Accelerate runs this job as {actual} (on {accelerator.device.type}): the "
                f"student is NOT sharded, each process holds all of it. Accelerate shards only across GPUs or other "
                f"accelerators.",
                stacklevel=2,
            )


def leave_process_group(synchronize: bool = True) -> bool:
    """Destroy the torch process group this process joined (``accelerate launch``, ``torchrun``), if any.

    A gloo/NCCL group still alive at interpreter exit can abort a rank after all its work is done
    ("terminate called without an active exception"), and torch warns that ``destroy_process_group()`` was
    not called. With ``synchronize`` the ranks first meet at a barrier, so none leaves while another still
    talks to it (pass False after an error: the other ranks may never get there). Returns whether a group
    was destroyed. Does not import torch when nothing imported it (``ki-trainer --help``).
    """
    import sys

    torch = sys.modules.get("torch")
    distributed = getattr(torch, "distributed", None) if torch is not None else None
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return False
    try:
        if synchronize:
            distributed.barrier()
    finally:
        distributed.destroy_process_group()
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def output_dir_lock(output_dir: str, is_main_process: bool = True) -> Iterator[Optional[str]]:
    """Hold ``<output_dir>/_ki_trainer.lock`` while a run writes ``output_dir``.

    Only the main process of a run takes the lock (so the ranks of one DDP run do not block each
    other). A lock whose process is gone (same host) is stale and taken over; a live one raises
    :class:`LaunchError` naming its host, pid and start time. A lock from another host cannot be
    checked: it also raises, and says to delete the file if that run is over.

    Yields:
        The lock file's path, or ``None`` on processes that do not take it.
    """
    if not is_main_process:
        yield None
        return
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            same_host = holder.get("host") == me["host"]
            pid = holder.get("pid")
            if same_host and isinstance(pid, int) and (pid == me["pid"] or not _pid_alive(pid)):
                os.remove(path)  # stale (or ours, re-entered): take it over
                continue
            raise LaunchError(
                f"Another run is writing {output_dir!r} (host {holder.get('host', '?')}, pid {pid}, started "
                f"{holder.get('started', '?')}). Two independent runs would overwrite each other's checkpoints and "
                f"model. Choose another output_dir, or delete {path} if that run is over."
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        break
    try:
        yield path
    finally:
        if _read_lock(path).get("pid") == me["pid"]:
            with contextlib.suppress(OSError):
                os.remove(path)
