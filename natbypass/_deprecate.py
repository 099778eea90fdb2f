"""Old public names kept as aliases that warn, so renames do not break callers."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any


def deprecated_alias(method: Callable[..., Any], old_name: str) -> Callable[..., Any]:
    """A method named C{old_name} that warns (C{DeprecationWarning}) and calls C{method}."""

    @functools.wraps(method)
    def alias(self: Any, *args: Any, **kwargs: Any) -> Any:
        warnings.warn(f"{old_name} is deprecated; use {method.__name__}", DeprecationWarning, stacklevel=2)
        return method(self, *args, **kwargs)

    alias.__name__ = old_name
    alias.__doc__ = f"Deprecated alias of L{{{method.__name__}}}."
    return alias
