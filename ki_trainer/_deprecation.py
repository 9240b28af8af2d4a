"""Old names that still work, with a warning that names the new one (transformers' style: a ``FutureWarning`` for
renames a user sees). The library itself, its examples and docs use only the new names."""

from __future__ import annotations

import functools
import warnings
from typing import Any


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """A ``FutureWarning``: ``old`` is deprecated, use ``new``."""
    warnings.warn(f"{old} is deprecated and will be removed in a future version; use {new}.", FutureWarning,
                  stacklevel=stacklevel)


def renamed_field(args, old: str, new: str, default: Any) -> None:
    """In a config's ``__post_init__``: move a value given under a field's earlier name ``old`` to ``new``, with a
    ``FutureWarning`` naming the new name. Both given with different values is an error."""
    value = getattr(args, old)
    if value is None:
        return
    # warn_renamed <- renamed_field <- __post_init__ <- the dataclass __init__ <- the caller
    warn_renamed(f"{type(args).__name__}({old}=...)", f"{new}={value!r}", stacklevel=5)
    if getattr(args, new) not in (default, value):
        raise ValueError(f"{old}={value!r} (the deprecated name of {new}) contradicts {new}={getattr(args, new)!r}; "
                         f"set {new} only.")
    setattr(args, new, value)
    setattr(args, old, None)


def renamed_method(method, old: str):
    """``old = renamed_method(new_method, "old")`` in a class body: calls ``new_method``, with a ``FutureWarning``."""

    @functools.wraps(method)
    def alias(self, *args, **kwargs):
        warn_renamed(f"{type(self).__name__}.{old}()", f"{method.__name__}()")
        return method(self, *args, **kwargs)

    alias.__name__ = old
    alias.__doc__ = f"Deprecated name of :meth:`{method.__name__}` (a ``FutureWarning``); same arguments."
    return alias
