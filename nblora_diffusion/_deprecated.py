"""Old names kept for one release: a module-level ``__getattr__`` that warns and returns the new object."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
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


class _MovedPackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import old.X`` gives the module ``new.X`` itself (not a second copy of its file)."""

    def __init__(self) -> None:
        self.moved: dict[str, str] = {}  # old package name -> new package name
        self.specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def new_name(self, fullname: str) -> str | None:
        for old, new in self.moved.items():
            if fullname.startswith(old + "."):
                return new + fullname[len(old) :]
        return None

    def find_spec(self, fullname, path=None, target=None):
        new = self.new_name(fullname)
        if new is None or importlib.util.find_spec(new) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(self.new_name(spec.name))
        self.specs[spec.name] = module.__spec__  # the import system sets __spec__ on what we return
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.specs.pop(module.__spec__.name)  # the module's own spec back


_moved_packages = _MovedPackages()


def moved_package(old: str, new: str) -> None:
    """Call from the ``__init__`` of a renamed package's old name: warn once (at its first import), then make
    ``old`` and every ``old.X`` resolve to the modules ``new`` and ``new.X`` themselves, for one release."""
    warnings.warn(
        f"the package {old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=3,
    )
    if _moved_packages not in sys.meta_path:
        sys.meta_path.insert(0, _moved_packages)  # before the path finder, which would load a second copy
    _moved_packages.moved[old] = new
    sys.modules[old] = importlib.import_module(new)  # what the import of ``old`` returns
