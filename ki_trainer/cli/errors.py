"""Errors a user can fix from the message alone: the ``ki-trainer`` command prints them without a traceback."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UsageError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class CommandError(UsageError):
    """A mistake in the command line, run file or data, with what to change; ``ki-trainer`` exits with status 2."""


def check_model_path(what: str, path: str) -> None:
    """Fail early, naming ``what`` (e.g. "teacher 0", "--student") when ``path`` is neither a local directory
    nor something ``from_pretrained`` could fetch (a Hub id; offline: one in the local Hub cache).

    Without this, a mistyped directory reaches transformers as a Hub id and fails with "Repo id must be in
    the form 'repo_name' or 'namespace/repo_name'" or a network error that names neither the option nor the path.
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CommandError(f"{what}: {path!r} is a file; give the model's directory (the one holding config.json).")
        return
    where = f"(relative paths are read from the current directory, {os.getcwd()})"
    parent = Path(path).parent
    local_looking = not HUB_ID.match(path) or (parent != Path(".") and parent.is_dir())  # e.g. outputs/teacher_9
    if local_looking:
        raise CommandError(f"{what}: no such model directory {path!r} {where}.")
    from ..pretrained.resolve import hub_offline

    if hub_offline():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
        except Exception:  # noqa: BLE001 - an id the cache cannot even look up is not cached
            cached = False
        if not cached:
            raise CommandError(
                f"{what}: {path!r} is not a local directory {where}, and the Hub is offline (HF_HUB_OFFLINE=1 or no "
                "network) with no cached copy of it. Check the path, or download the model first."
            )
