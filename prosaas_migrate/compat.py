"""What differs between the Alembic versions the package declares (alembic>=1.12), in one place.

The tool is installed into the app's own environment, so it runs with whatever Alembic the app
pins: a Flask-Migrate app may hold 1.12. Every call that exists only in newer releases goes
through here.
"""

from __future__ import annotations

import functools
import re
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic 1.16 added [tool.alembic] in pyproject.toml (Config's toml_file): before it, Alembic
# ignores that table, and so must everything here that reads a project as Alembic does.
PYPROJECT_SINCE = (1, 16)


@functools.cache
def alembic_version() -> tuple[int, ...]:
    """The installed Alembic's release, read from its metadata (no import: the fast path)."""
    try:
        text = metadata.version("alembic")
    except metadata.PackageNotFoundError:  # on sys.path without metadata (a source checkout)
        import alembic

        text = alembic.__version__
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def alembic_version_text() -> str:
    return ".".join(map(str, alembic_version()))


def reads_pyproject() -> bool:
    """Whether the installed Alembic reads [tool.alembic] from pyproject.toml."""
    return alembic_version() >= PYPROJECT_SINCE


def new_config(ini_path: str | None, toml_path: str | None) -> Config:
    """Alembic's Config for these files; pyproject.toml only where this Alembic reads it."""
    from alembic.config import Config

    if reads_pyproject():
        return Config(file_=ini_path, toml_file=toml_path)
    return Config(file_=ini_path)


def config_file_name(cfg: Config) -> str | None:
    """The file a Config was read from, to name in messages: the ini, else the pyproject.toml."""
    name: str | None = cfg.config_file_name or getattr(cfg, "toml_file_name", None)
    return name
