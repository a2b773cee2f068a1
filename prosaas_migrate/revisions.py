"""The Alembic project read as plain files: where its config is, and the revision graph.

Importing Alembic (and with it SQLAlchemy) costs about 350 ms, most of a restart on a schema that
is already current. This reader answers "which revisions exist, which are heads" from the
revision files' source alone, but only for projects it can read exactly as Alembic does: any
setting it does not understand, a pyproject.toml setting beyond the template's, a custom version
table in env.py, branch labels, computed ids... make it answer None ("unsure"), and Alembic
decides. It must never be more optimistic than Alembic.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from prosaas_migrate import compat
from prosaas_migrate.errors import ConfigError

# Alembic's own filter for revision files (script/base.py, _only_source_rev_file).
_REVISION_FILE = re.compile(r"(?!\.\#|__init__)(.*\.py)$")
# Settings whose effect on "which revisions exist" this reader reproduces exactly. Anything
# else (version_locations, recursive_version_locations, sourceless, a key env.py reads itself)
# sends the project to Alembic. path_separator and version_path_separator only split
# multi-valued options; prepend_sys_path only changes imports, and revision ids are read here
# from literals, never imported.
_UNDERSTOOD = frozenset(
    {
        "script_location",
        "prepend_sys_path",
        "path_separator",
        "version_path_separator",
        "file_template",
        "timezone",
        "truncate_slug_length",
        "output_encoding",
        "revision_environment",
        "post_write_hooks",
        "sqlalchemy.url",
    }
)
TOML_NAME = "pyproject.toml"


@dataclass(frozen=True)
class Project:
    """The Alembic settings the runner needs before (or instead of) importing Alembic."""

    ini_path: str  # what Alembic's Config gets as file_ (it may not exist: pyproject-only)
    toml_path: str | None  # the pyproject.toml Alembic reads [tool.alembic] from, if any
    script_location: str
    url: str | None  # sqlalchemy.url in [alembic]
    engines: dict[str, str | None] = field(default_factory=dict)  # multidb: name -> its URL
    unsure: str | None = None  # why the fast path cannot read this project; None = it can

    @property
    def path(self) -> str:
        """The file to name in messages."""
        return self.ini_path if os.path.isfile(self.ini_path) else (self.toml_path or "")


@dataclass(frozen=True)
class Graph:
    """The revision ids found, and which of them are heads."""

    revisions: frozenset[str]
    heads: tuple[str, ...]


def read_project(config_path: str, source: str) -> Project:
    """Find the ini and pyproject.toml as Alembic's command line does; ConfigError if unusable."""
    variable = source if source != "default" else "ALEMBIC_CONFIG"
    if os.path.basename(config_path) == TOML_NAME:
        ini_path, toml_path = "alembic.ini", config_path
    else:
        ini_path, toml_path = config_path, TOML_NAME
    toml = _read_toml(toml_path, variable)
    ini = _read_ini(ini_path, variable) if os.path.isfile(ini_path) else None
    if toml is not None and not compat.reads_pyproject():
        if ini is None:  # Alembic before 1.16 would not see this project at all
            raise ConfigError(
                variable,
                config_path,
                f"an alembic.ini ([tool.alembic] in {toml_path} needs Alembic "
                f"{'.'.join(map(str, compat.PYPROJECT_SINCE))} or newer; this environment has "
                f"{compat.alembic_version_text()})",
            )
        toml = None  # ignored by this Alembic, so here too
    if ini is None and toml is None:
        raise ConfigError(
            variable,
            config_path,
            "the path of an existing alembic.ini (or of a pyproject.toml with [tool.alembic])",
        )
    section = dict(ini[0]) if ini else {}
    toml_settings = toml or {}
    script_location = section.get("script_location") or toml_settings.get("script_location")
    if not isinstance(script_location, str) or not script_location:
        raise ConfigError(
            variable,
            config_path,
            "an Alembic config with script_location in [alembic] (or in [tool.alembic] of "
            "pyproject.toml)",
        )
    engines = ini[1] if ini else {}
    unsure = _why_unsure(section, toml_settings, script_location, engines)
    url = section.get("sqlalchemy.url")
    return Project(
        ini_path=ini_path,
        toml_path=toml_path if toml is not None else None,
        script_location=script_location,
        url=url,
        engines=engines,
        unsure=unsure,
    )


def _read_ini(path: str, variable: str) -> tuple[dict[str, str], dict[str, str | None]]:
    """[alembic] (with %(here)s, as Alembic's Config) and multidb's engine URLs."""
    parser = configparser.ConfigParser({"here": os.path.abspath(os.path.dirname(path))})
    try:
        parser.read(path, encoding="utf-8")
        if not parser.has_section("alembic"):
            return {}, {}
        section = {key: parser.get("alembic", key) for key in parser.options("alembic")}
        section.pop("here", None)
        engines: dict[str, str | None] = {}
        for name in [n.strip() for n in section.get("databases", "").split(",") if n.strip()]:
            has = parser.has_option(name, "sqlalchemy.url")
            engines[name] = parser.get(name, "sqlalchemy.url") if has else None
    except (configparser.Error, UnicodeDecodeError, ValueError) as exc:
        one_line = " ".join(str(exc).split())
        raise ConfigError(variable, path, f"a readable Alembic ini ({one_line})") from None
    return section, engines


def _read_toml(path: str, variable: str) -> dict[str, object] | None:
    """[tool.alembic] of pyproject.toml with %(here)s substituted, or None if there is none."""
    if not os.path.isfile(path):
        return None
    import tomllib

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(variable, path, f"a readable pyproject.toml ({exc})") from None
    tool = data.get("tool")
    settings = tool.get("alembic") if isinstance(tool, dict) else None
    if not isinstance(settings, dict):
        return None
    here = Path(path).absolute().parent.as_posix()
    location = settings.get("script_location")
    if isinstance(location, str):
        with suppress(KeyError, ValueError, TypeError):  # Alembic will say what is wrong
            settings["script_location"] = location % {"here": here}
    return settings


def _why_unsure(
    section: dict[str, str],
    toml: dict[str, object],
    script_location: str,
    engines: dict[str, str | None],
) -> str | None:
    if engines:
        return "several databases (multidb)"
    for origin, keys in (("alembic.ini", section), ("pyproject.toml", toml)):
        for key in keys:
            if key not in _UNDERSTOOD and not key.startswith("sqlalchemy."):
                return f"{key} in {origin}"
    if ":" in script_location and not os.path.isabs(script_location):
        return "script_location names a package resource"
    env_py = Path(script_location) / "env.py"
    try:
        env_source = env_py.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"{env_py} cannot be read"
    if "version_table" in env_source or "search_path" in env_source:
        return "env.py chooses its own version table (or search_path)"
    if _configure_takes_unpacked_options(env_source):
        return "env.py passes context.configure() options it builds at run time"
    return None


def _configure_takes_unpacked_options(source: str) -> bool:
    """Whether env.py calls configure(**options): a version table could hide in there."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return True
    return any(
        isinstance(node, ast.Call)
        and any(keyword.arg is None for keyword in node.keywords)
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "configure"
        for node in ast.walk(tree)
    )


def read_graph(project: Project) -> Graph | None:
    """Every revision id and the heads, exactly as Alembic would find them; None when unsure."""
    if project.unsure is not None:
        return None
    versions = Path(project.script_location) / "versions"  # relative to the working folder
    if not versions.is_dir():
        return None
    revisions: dict[str, tuple[str, ...]] = {}
    for entry in sorted(versions.iterdir()):
        if not _REVISION_FILE.match(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            continue  # Alembic skips folders unless recursive_version_locations (then: unsure)
        if not entry.is_file():
            return None  # a dangling symlink or a special file: Alembic would fail on it
        found = _read_revision(entry)
        if found is None or found[0] in revisions:
            return None
        revisions[found[0]] = found[1]
    parents = {parent for downs in revisions.values() for parent in downs}
    if not parents <= revisions.keys() or _has_cycle(revisions):
        return None  # a dangling, symbolic or circular down_revision: Alembic's to judge
    return Graph(frozenset(revisions), tuple(sorted(revisions.keys() - parents)))


def _has_cycle(revisions: dict[str, tuple[str, ...]]) -> bool:
    """Whether following down_revisions ever comes back (Alembic raises CycleDetected)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in revisions:
        stack = [(start, iter(revisions[start]))]
        if state.get(start):
            continue
        state[start] = 1
        while stack:
            node, parents = stack[-1]
            parent = next(parents, None)
            if parent is None:
                state[node] = 2
                stack.pop()
            elif state.get(parent) == 1:
                return True
            elif not state.get(parent):
                state[parent] = 1
                stack.append((parent, iter(revisions[parent])))
    return False


# What a revision module may do at its top level for its ids to be read without running it.
_KEYS = frozenset({"revision", "down_revision", "branch_labels", "depends_on"})
_SAFE_IMPORTS = ("alembic", "sqlalchemy", "__future__")
_ILLEGAL_ID = frozenset("@-+:")  # Alembic refuses revision ids holding these


def _read_revision(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """(revision, down_revisions) from module-level literals, or None if anything is unusual:
    anything that could fail at import or bind the ids otherwise is Alembic's to run."""
    try:
        source = path.read_bytes()
        tree = ast.parse(source, filename=str(path))
        compile(tree, str(path), "exec", dont_inherit=True)  # what only the compiler checks
    except (OSError, SyntaxError, ValueError):
        return None
    values: dict[str, object] = {}
    for node in tree.body:
        if not _harmless(node):
            return None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in _KEYS:
                if target.id in values or len(targets) != 1:
                    return None
                try:
                    values[target.id] = ast.literal_eval(value)
                except ValueError:
                    values[target.id] = _COMPUTED
    if _bound_elsewhere(tree):
        return None
    revision, down = values.get("revision"), values.get("down_revision", _COMPUTED)
    if values.get("branch_labels") or values.get("depends_on"):
        return None
    if not isinstance(revision, str) or not revision or _ILLEGAL_ID & set(revision):
        return None
    if down is None:
        return revision, ()
    if isinstance(down, str):
        return revision, (down,)
    if isinstance(down, tuple | list) and all(isinstance(d, str) for d in down):
        return revision, tuple(down)
    return None


def _harmless(node: ast.stmt) -> bool:
    """A top-level statement that cannot fail at import: a docstring, an import of Alembic,
    SQLAlchemy or the standard library, an assignment of names, literals and type hints, a
    def or class. Anything else (a call, an if, a try, an import of the app) is Alembic's."""
    import sys

    if isinstance(node, ast.Expr):
        return isinstance(node.value, ast.Constant)
    if isinstance(node, ast.Import | ast.ImportFrom):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        if isinstance(node, ast.ImportFrom) and node.level:
            return False  # relative: depends on how Alembic names the module
        return all(
            m is not None
            and (m.split(".")[0] in _SAFE_IMPORTS or m.split(".")[0] in sys.stdlib_module_names)
            for m in modules
        )
    if isinstance(node, ast.Assign | ast.AnnAssign):
        parts = [node.value] if isinstance(node, ast.Assign) else [node.value, node.annotation]
        return all(part is None or _inert(part) for part in parts)
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and (
        node.name not in _KEYS and not node.decorator_list
    )


def _inert(expression: ast.expr) -> bool:
    """An expression that evaluates without calling anything: literals, names, attributes,
    subscripts (Union[str, None]) and `|` between them."""
    for node in ast.walk(expression):
        if isinstance(node, ast.BinOp) and not isinstance(node.op, ast.BitOr):
            return False
        if not isinstance(
            node,
            ast.Constant
            | ast.Name
            | ast.Attribute
            | ast.Subscript
            | ast.Tuple
            | ast.List
            | ast.Load
            | ast.BinOp
            | ast.BitOr
            | ast.UnaryOp
            | ast.USub,
        ):
            return False
    return True


def _bound_elsewhere(tree: ast.Module) -> bool:
    """Whether an id name is bound other than by its one top-level assignment: in a function
    (`global`), by an import alias, a walrus, a loop or an augmented assignment."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Global | ast.Nonlocal) and _KEYS & set(node.names):
            return True
        if isinstance(node, ast.alias) and (node.asname or node.name) in _KEYS:
            return True
        if (
            isinstance(node, ast.NamedExpr | ast.AugAssign)
            and getattr(node.target, "id", None) in _KEYS
        ):
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in {"globals", "exec"}:
            return True
    return False


_COMPUTED = object()  # a value that is not a literal: only Alembic can know it
