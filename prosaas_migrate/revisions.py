"""The Alembic project read as plain files: the ini's settings and the head revision ids.

Importing Alembic (and with it SQLAlchemy) costs about 350 ms, most of a restart on a schema that
is already current. This reader answers "which revisions are heads" from the revision files'
source alone, and answers None whenever Alembic could see it differently (branch labels,
depends_on, extra version locations, computed ids); Alembic then decides.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
from dataclasses import dataclass
from pathlib import Path

from prosaas_migrate.errors import ConfigError

# Alembic's own filter for revision files (script/base.py, _only_source_rev_file).
_REVISION_FILE = re.compile(r"(?!\.\#|__init__)(.*\.py)$")
# Options that change where Alembic looks for revisions: leave those projects to Alembic.
_UNSUPPORTED_OPTIONS = ("version_locations", "recursive_version_locations", "sourceless")


@dataclass(frozen=True)
class AlembicIni:
    """The [alembic] settings the runner needs before (or instead of) importing Alembic."""

    path: str
    script_location: str
    url: str | None
    plain_layout: bool  # no option that moves revisions beyond script_location/versions


def read_ini(path: str, source: str) -> AlembicIni:
    """Read the ini as Alembic's Config does (with %(here)s); ConfigError names its origin."""
    variable = source if source != "default" else "ALEMBIC_CONFIG"
    if not os.path.isfile(path):
        raise ConfigError(variable, path, "the path of an existing alembic.ini (or --config)")
    parser = configparser.ConfigParser({"here": os.path.abspath(os.path.dirname(path))})
    try:
        parser.read(path)
        section = parser["alembic"]
        script_location = section.get("script_location")
        url = section.get("sqlalchemy.url")
    except (configparser.Error, KeyError) as exc:
        raise ConfigError(variable, path, f"a readable Alembic ini ({exc})") from None
    if not script_location:
        raise ConfigError(variable, path, "an alembic.ini with script_location in [alembic]")
    plain = not any(section.get(option) for option in _UNSUPPORTED_OPTIONS)
    return AlembicIni(path, script_location, url, plain)


def heads(ini: AlembicIni) -> tuple[str, ...] | None:
    """The head revision ids, sorted, exactly as Alembic would find them; None when unsure."""
    if not ini.plain_layout or ":" in ini.script_location:  # "package:path" resources
        return None
    versions = Path(ini.script_location) / "versions"  # relative to the working folder, as Alembic
    if not versions.is_dir():
        return None
    revisions: dict[str, tuple[str, ...]] = {}
    for entry in sorted(versions.iterdir()):
        if not entry.is_file() or not _REVISION_FILE.match(entry.name):
            continue
        found = _read_revision(entry)
        if found is None or found[0] in revisions:
            return None
        revisions[found[0]] = found[1]
    parents = {parent for downs in revisions.values() for parent in downs}
    if not parents <= revisions.keys():
        return None  # a dangling or symbolic down_revision: Alembic's to judge
    return tuple(sorted(revisions.keys() - parents))


def _read_revision(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """(revision, down_revisions) from module-level literals, or None if anything is unusual."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    values: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            if target.id in values:
                return None
            try:
                values[target.id] = ast.literal_eval(value)
            except ValueError:
                values[target.id] = _COMPUTED
    revision, down = values.get("revision"), values.get("down_revision", _COMPUTED)
    if values.get("branch_labels") or values.get("depends_on"):
        return None
    if not isinstance(revision, str) or not revision:
        return None
    if down is None:
        return revision, ()
    if isinstance(down, str):
        return revision, (down,)
    if isinstance(down, tuple | list) and all(isinstance(d, str) for d in down):
        return revision, tuple(down)
    return None


_COMPUTED = object()  # a value that is not a literal: only Alembic can know it
