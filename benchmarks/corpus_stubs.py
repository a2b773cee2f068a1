"""Stand-ins for the third-party modules a corpus project's code imports but the venv lacks.

The corpus installs each project's wheel without its dependencies (pydantic, flask, ...): its
revisions need only the project's own column types, which are plain SQLAlchemy, but the modules
that define them import much more. A name that no real finder can import, asked for by code
under one of the folders in $PROSAAS_CORPUS_STUB_FOR, gets a module whose every attribute is a
permissive class (a base class, a decorator, a type argument). Everything else imports as
usual, so a missing module in the venv's own code still fails loudly. This file is also
written as `sitecustomize.py` on the PYTHONPATH of the `prosaas-migrate lint` it runs, where
it also appends the wheel's folder ($PROSAAS_CORPUS_SITE) to sys.path. A project whose code
needs more than stand-ins (prefect's settings are pydantic models) is installed with its
dependencies instead, and gets no stubs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from collections.abc import Sequence
from typing import Any

STUBBED: set[str] = set()  # top-level names stood in for, in this process


class _Permissive(type):
    """A class that is also any attribute, call, subscript or union of itself."""

    def __new__(
        mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **_: Any
    ) -> Any:
        return super().__new__(mcs, name, bases, namespace)

    def __init__(cls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **_: Any):
        super().__init__(name, bases, namespace)

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _permissive(f"{cls.__qualname__}.{name}")

    def __getitem__(cls, _item: Any) -> Any:
        return cls

    def __or__(cls, _other: Any) -> Any:
        return cls

    def __ror__(cls, _other: Any) -> Any:
        return cls

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # used as a decorator: keep what it decorates
        return _permissive(f"{cls.__qualname__}()")


def _permissive(name: str) -> Any:
    return _Permissive(name.rsplit(".", 1)[-1], (), {"__qualname__": name})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _permissive(f"{self.__name__}.{name}")


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__file__ = os.path.join(os.devnull, *spec.name.split("."), "__init__.py")
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        STUBBED.add(module.__name__.split(".")[0])


class StubFinder(importlib.abc.MetaPathFinder):
    """Last on sys.meta_path: answers only what every real finder gave up on."""

    def __init__(self, folders: Sequence[str]) -> None:
        self.folders = tuple(os.path.abspath(folder) + os.sep for folder in folders if folder)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        top = fullname.split(".")[0]
        if top in sys.stdlib_module_names or not self._asked_by_project():
            return None
        return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)

    def _asked_by_project(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.startswith(self.folders):
                return True
            frame = frame.f_back  # type: ignore[assignment]
        return False


def install(folders: Sequence[str]) -> StubFinder:
    finder = StubFinder(folders)
    sys.meta_path.append(finder)
    return finder


if __name__ == "sitecustomize":
    # After the venv's own folders, so its SQLAlchemy and Alembic are the ones imported.
    sys.path.extend(filter(None, os.environ.get("PROSAAS_CORPUS_SITE", "").split(os.pathsep)))
    if os.environ.get("PROSAAS_CORPUS_STUB_FOR"):
        install(os.environ["PROSAAS_CORPUS_STUB_FOR"].split(os.pathsep))
