"""Old names kept for one release: a module-level ``__getattr__`` that warns and returns the new object."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable


def deprecated_names(module: str, renamed: dict[str, tuple[str, Callable[[], object]]]) -> Callable:
    """A ``__getattr__`` for ``module``: ``renamed`` maps an old name to (the new name, a getter).

    Accessing an old name (``from module import old``) raises a DeprecationWarning naming the new one.
    """

    def __getattr__(name: str):
        if name in renamed:
            new, get = renamed[name]
            warnings.warn(
                f"{module}.{name} is deprecated and will be removed in the next release; use {new}",
                DeprecationWarning,
                stacklevel=2,
            )
            return get()
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def keyword_only_since(n_positional: int, names: tuple[str, ...]) -> Callable:
    """Keep the old positional calls of a function whose parameters after the first ``n_positional`` are
    now keyword-only: the extra positional values are passed as ``names`` (in order), with a
    DeprecationWarning. For one release, so that callers can switch to keywords."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if len(args) > n_positional:
                extra = args[n_positional:]
                if len(extra) > len(names):
                    raise TypeError(f"{fn.__name__}() takes at most {n_positional + len(names)} arguments")
                given = names[: len(extra)]
                clash = sorted(set(given) & set(kwargs))
                if clash:
                    raise TypeError(f"{fn.__name__}() got multiple values for {clash}")
                warnings.warn(
                    f"{fn.__name__}(): pass {', '.join(given)} by keyword (positional use is deprecated)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs.update(zip(given, extra, strict=True))
                args = args[:n_positional]
            return fn(*args, **kwargs)

        return call

    return wrap
