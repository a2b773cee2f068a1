"""Render revisions to SQL with Alembic's offline mode (`as_sql`): no database, no connection.

The project's own env.py renders when it has an offline branch; an env.py without one (the
cookbook style, ours included) tries to connect, which a guard refuses, and prosaas-migrate's own
offline PostgreSQL context renders instead. One Alembic session is fed one revision at a time and
the output is cut where each revision starts, so each revision's SQL is its own; a revision that
cannot be rendered ends its session, is recorded with its error, and a new session goes on after
it. Like migrations.py, this module imports Alembic; unlike it, it never connects to anything.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationStep
from alembic.script import Script, ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Dialect

from prosaas_migrate import compat
from prosaas_migrate.errors import ConfigError, RevisionsUnreadable

if TYPE_CHECKING:
    from prosaas_migrate.revisions import Project

# What env.py finds in sqlalchemy.url: a PostgreSQL dialect for offline rendering, and a Unix
# socket that cannot exist, so that even a connection the guard missed goes nowhere.
OFFLINE_URL = "postgresql+psycopg:///offline?host=/dev/null/prosaas-migrate-lint"
OWN_RENDERER = "prosaas-migrate"
# Alembic matches a prefix (of any length) only against ids of 4 or more characters.
SINCE_EXPECTED = (
    "a revision of this project: an id, a unique prefix of an id of 4+ characters, base or heads"
)
ENV_PY_RENDERER = "env.py"


@dataclass(frozen=True)
class Chunk:
    """A stretch of offline SQL in output order: one revision's, or Alembic's own around them."""

    sql: str
    revision: Script | None = None  # None: a session's opening or closing (BEGIN;, COMMIT;)
    error: str | None = None  # the revision could not be rendered offline: why, in one line
    session_start: bool = False  # the first chunk of a fresh session: no transaction is open
    # A session that goes on after a revision that could not be rendered: online, the upgrade
    # would have gone on in the same transaction, with the locks it holds.
    resumed: bool = False
    # Where the revision file's code wrote each piece of its SQL: (offset in `sql`, line), in
    # order; the line of a failed revision's error, when the error passed through its file.
    lines: tuple[tuple[int, int], ...] = ()
    error_line: int | None = None
    error_hint: str | None = None  # what to do instead, when the error is a known idiom

    def line_of(self, start: int, stop: int) -> int | None:
        """The revision file's line whose operation wrote the SQL in [start, stop), if known.

        A write that begins inside the statement wrote it; else the statement is a later one
        of an earlier write (op.execute("ALTER ...; UPDATE ...")): that write's line.
        """
        before = None
        for at, line in self.lines:
            if start <= at < stop:
                return line
            if at <= start:
                before = line
        return before


@dataclass
class Rendering:
    """Every chunk of every session, and which env.py rendered them (and why not the project's)."""

    chunks: list[Chunk] = field(default_factory=list)
    renderer: str = ENV_PY_RENDERER
    fallback_reason: str | None = None
    warning: str | None = None


class ConnectAttempt(Exception):
    """Raised in place of any database connection while rendering offline."""

    def __init__(self) -> None:
        super().__init__("it tried to connect to a database (offline rendering never connects)")


def load_script_directory(project: Project, variable: str) -> tuple[Config, ScriptDirectory]:
    """The project's Alembic Config (its URL replaced by OFFLINE_URL) and revisions, all loaded.

    ConfigError (naming `variable`, where the ini path came from) for a script location Alembic
    cannot use; RevisionsUnreadable for a revision file that does not load, since without
    every file the history is unknown.
    """
    ini_path = project.ini_path if os.path.isfile(project.ini_path) else None
    cfg = compat.new_config(ini_path, project.toml_path)
    cfg.set_main_option("sqlalchemy.url", OFFLINE_URL)
    try:
        _check_toml_types(cfg, project.toml_path)
        script = ScriptDirectory.from_config(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # Alembic trusts the config's types: a TypeError is a bad value
        raise ConfigError(variable, project.path, f"an Alembic project ({one_line(exc)})") from None
    try:
        script.revision_map.heads  # noqa: B018 - loads every revision file now
    except SyntaxError as exc:
        where = f"{display_path(exc.filename)}:{exc.lineno}" if exc.filename else project.path
        raise RevisionsUnreadable(where, f"SyntaxError: {exc.msg}") from None
    except (Exception, SystemExit) as exc:  # a file that raises or exits on import, a cycle...
        raise RevisionsUnreadable(script.versions, one_line(exc)) from None
    return cfg, script


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_int(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().isdigit()
    return isinstance(value, int) and not isinstance(value, bool)


def _is_strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_hooks(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(hook, dict) and _is_strings(list(hook.values())) for hook in value
    )


# What Alembic expects of each [tool.alembic] key it reads to find the revisions. It does not
# check them itself: `version_locations = 5` is a TypeError, and a string where a list belongs
# is split into one-letter folders, so no revision would be found and lint would pass.
_TOML_TYPES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "script_location": ("a string", _is_str),
    "file_template": ("a string", _is_str),
    "output_encoding": ("a string", _is_str),
    "timezone": ("a string", _is_str),
    "truncate_slug_length": ("an integer", _is_int),
    "version_locations": ("a list of strings", _is_strings),
    "prepend_sys_path": ("a list of strings", _is_strings),
    "sourceless": ("true or false", _is_bool),
    "recursive_version_locations": ("true or false", _is_bool),
    "post_write_hooks": ("a list of tables of strings", _is_hooks),
}


def _check_toml_types(cfg: Config, toml_path: str | None) -> None:
    """ConfigError naming the pyproject.toml key whose value Alembic would choke on."""
    if toml_path is None:
        return
    settings = cfg.toml_alembic_config
    for key, (expected, fits) in _TOML_TYPES.items():
        if key not in settings or cfg.file_config.has_option(cfg.config_ini_section, key):
            continue  # absent, or the ini's value wins (Alembic reads the ini first)
        if not fits(settings[key]):
            raise ConfigError(
                f"[tool.alembic] {key} in {toml_path}", json.dumps(settings[key]), expected
            )


def select(script: ScriptDirectory, since: str | None) -> tuple[list[Script], tuple[str, ...]]:
    """The revisions to render in upgrade order, and the heads they start from.

    Without `since`, every revision from base. With it, what `alembic upgrade heads` would apply
    to a database at `since` (what a branch adds to it); ConfigError for any `since` Alembic
    cannot resolve (unknown, ambiguous, empty).
    """
    if since is None:
        start: tuple[str, ...] = ()
    elif not since.strip():
        # Alembic answers an empty id with an AssertionError; in CI it means the command that
        # was to print the revision printed nothing.
        raise ConfigError("--since", since, f"{SINCE_EXPECTED}, not an empty string")
    else:
        try:
            found = script.revision_map.get_revisions(since)
        except Exception as exc:  # RevisionError, CommandError, and asserts on odd input
            raise ConfigError("--since", since, f"{SINCE_EXPECTED} ({one_line(exc)})") from None
        start = tuple(r.revision for r in found if r is not None and not isinstance(r, str))
    try:
        ordered = list(script.revision_map.iterate_revisions("heads", start, implicit_base=True))
    except Exception as exc:
        raise ConfigError("--since", since, f"{SINCE_EXPECTED} ({one_line(exc)})") from None
    return [r for r in reversed(ordered) if isinstance(r, Script)], start


def render(
    cfg: Config | None,
    script: ScriptDirectory,
    revisions: Sequence[Script],
    *,
    starting_heads: Sequence[str] = (),
) -> Rendering:
    """Render `revisions` (in upgrade order, starting from `starting_heads`) to offline SQL.

    With `cfg`, through the project's env.py when it renders offline; without (or when it does
    not), through our own offline PostgreSQL context, never running project code beyond the
    revisions themselves.
    """
    result = Rendering()
    if cfg is None:
        result.renderer, result.fallback_reason = OWN_RENDERER, None
    elif cfg.get_main_option("databases"):
        # The multidb template's offline branch writes one file per database into the
        # working folder; render each database's part with our own context instead.
        result.renderer = OWN_RENDERER
        result.fallback_reason = "env.py is the multidb template (it writes .sql files)"
    engines = _engine_names(cfg) if result.renderer == OWN_RENDERER else [None]
    for engine in engines:
        _render_all(cfg, script, list(revisions), tuple(starting_heads), engine, result)
    if result.renderer == ENV_PY_RENDERER and (silent := _rendered_nothing(result, revisions)):
        # Alembic writes at least the version table's row for every revision it runs: output
        # without it went somewhere else (env.py's own file, a log) or never happened.
        result.chunks.clear()
        result.renderer, result.fallback_reason = OWN_RENDERER, silent
        _render_all(cfg, script, list(revisions), tuple(starting_heads), None, result)
    return result


def _rendered_nothing(result: Rendering, revisions: Sequence[Script]) -> str | None:
    """Why env.py's rendering cannot be what the revisions produce, or None when it can be."""
    if not revisions:
        return None
    rendered = [chunk for chunk in result.chunks if chunk.revision is not None]
    if not rendered:
        return "env.py's offline branch rendered no revision (it never ran the migrations)"
    silent = [
        chunk.revision.revision
        for chunk in rendered
        if chunk.revision is not None and chunk.error is None and not _has_sql(chunk.sql)
    ]
    if silent and len(silent) == len(rendered):
        return "env.py's offline branch wrote no SQL where Alembic wrote it (not to its output)"
    if silent:
        return f"env.py's offline branch wrote no SQL for {', '.join(silent[:3])}"
    return None


def _has_sql(sql: str) -> bool:
    from pglast.parser import split

    try:
        return bool(split(sql, with_parser=False, only_slices=True))
    except Exception:  # text the scanner rejects is still text; lint reports it
        return bool(sql.strip())


def _render_all(
    cfg: Config | None,
    script: ScriptDirectory,
    todo: list[Script],
    heads: tuple[str, ...],
    engine: str | None,
    result: Rendering,
) -> None:
    first = True
    while todo or first:
        feeder = _Feeder(script, todo, heads)
        feeder.resumed = not first
        session = _session(cfg, script, feeder, engine, result)
        if session is None:  # env.py could not render at all: go on with our own context
            continue
        chunks, failure = session
        result.chunks.extend(chunks)
        first = False
        todo = todo[len(feeder.done) + (failure is not None) :]
        heads = feeder.heads
        if failure is None:
            return


def _session(
    cfg: Config | None,
    script: ScriptDirectory,
    feeder: _Feeder,
    engine: str | None,
    result: Rendering,
) -> tuple[list[Chunk], str | None] | None:
    """One Alembic offline run: its chunks and the failing revision's error (if one failed).

    None when the project's env.py could not render offline before reaching any revision; the
    renderer is then switched to our own.
    """
    buffer = _LineBuffer(feeder)
    feeder.buffer = buffer
    own = result.renderer == OWN_RENDERER
    context = EnvironmentContext(
        cfg if cfg is not None else Config(),
        script,
        fn=feeder.steps,
        as_sql=True,
        starting_rev=feeder.heads or None,
        destination_rev="heads",
        output_buffer=buffer,
    )
    error: BaseException | None = None
    with _no_connections(), _captured_output(), context:
        try:
            if own:
                _run_own_env(context, {} if engine is None else {"engine_name": engine})
            else:
                script.run_env()
        except (Exception, SystemExit) as exc:  # sys.exit() in env.py or a revision, too
            error = exc
    if error is not None and not feeder.started and not own:
        result.renderer = OWN_RENDERER
        result.fallback_reason = (
            "env.py has no offline branch: it tried to connect"
            if isinstance(error, ConnectAttempt)
            else f"env.py fails offline: {one_line(error)}"
        )
        return None
    if feeder.foreign_dialect and not own:
        result.renderer = OWN_RENDERER
        result.fallback_reason = f"env.py renders for {feeder.foreign_dialect}, not postgresql"
        return None
    if feeder.started and not feeder.transactional_ddl:
        result.warning = (
            "env.py sets transactional_ddl=False, so the SQL has no BEGIN/COMMIT and "
            "concurrently-in-transaction cannot see transactions"
        )
    if error is not None and not feeder.started and feeder.todo:
        # Our own context failed before any revision: never pass silently, blame the first.
        feeder.current = feeder.todo[0]
        feeder.starts.append(0)
    failure = None
    if error is not None and feeder.current is not None:
        failure = one_line(error)
        feeder.error_line = _line_in(error, feeder.current.path)
        feeder.error_hint = _hint(error)
        if feeder.error_line is not None:
            failure += f" (at {display_path(feeder.current.path)}:{feeder.error_line})"
    elif error is not None:  # after the last revision: every revision's SQL is there
        result.warning = f"{result.renderer} failed after the migrations: {one_line(error)}"
    return feeder.chunks(buffer.getvalue(), failure), failure


def _run_own_env(context: EnvironmentContext, kwargs: dict[str, Any]) -> None:
    """What an offline env.py does, for PostgreSQL: one transaction around the migrations."""
    context.configure(
        dialect_name="postgresql",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations(**kwargs)


class _Feeder:
    """Hands Alembic one revision step at a time and notes where each one's output starts."""

    def __init__(self, script: ScriptDirectory, todo: list[Script], heads: tuple[str, ...]) -> None:
        self.revision_map = script.revision_map
        self.todo = todo
        self.heads = heads
        self.buffer = io.StringIO()
        self.started = False
        self.foreign_dialect: str | None = None
        self.transactional_ddl = True
        self.current: Script | None = None
        self.done: list[Script] = []
        self.starts: list[int] = []  # offset where each revision's output begins
        self.end: int | None = None  # offset after the last revision
        self.lines: list[tuple[int, int]] = []  # (offset, line of the current revision's file)
        self.error_line: int | None = None
        self.error_hint: str | None = None
        self.resumed = False  # this session goes on after a revision that failed to render

    def steps(self, _heads: Any, context: MigrationContext) -> Iterator[MigrationStep]:
        self.started = True
        if context.dialect.name != "postgresql":
            self.foreign_dialect = context.dialect.name
            return
        self.transactional_ddl = bool(context.impl.transactional_ddl)
        for revision in self.todo:
            self.current = revision
            self.starts.append(self.buffer.tell())
            yield MigrationStep.upgrade_from_script(self.revision_map, revision)
            # Alembic asks for the next step only after this one rendered without error.
            self.done.append(revision)
            self.heads = _apply(self.heads, revision)
            self.current = None
        self.end = self.buffer.tell()

    def chunks(self, text: str, failure: str | None) -> list[Chunk]:
        """Cut the session's output at each revision's start; a failed revision keeps no SQL."""
        if not self.starts:
            return [Chunk(text, session_start=True, resumed=self.resumed)]
        out = [Chunk(text[: self.starts[0]], session_start=True, resumed=self.resumed)]
        bounds = [*self.starts[1:], self.end if self.end is not None else len(text)]
        offsets = [at for at, _line in self.lines]  # in order: the buffer only grows
        for revision, start, stop in zip(self.done, self.starts, bounds, strict=False):
            first, last = bisect.bisect_left(offsets, start), bisect.bisect_left(offsets, stop)
            lines = tuple((at - start, line) for at, line in self.lines[first:last])
            out.append(Chunk(text[start:stop], revision, lines=lines))
        if failure is not None and self.current is not None:
            self.heads = _apply(self.heads, self.current)
            out.append(
                Chunk(
                    "",
                    self.current,
                    error=failure,
                    error_line=self.error_line,
                    error_hint=self.error_hint,
                )
            )
        elif self.end is not None:
            out.append(Chunk(text[self.end :]))
        return out


class _LineBuffer(io.StringIO):
    """Alembic's output buffer, noting which line of the revision file wrote each piece."""

    def __init__(self, feeder: _Feeder) -> None:
        super().__init__()
        self.feeder = feeder

    def write(self, text: str) -> int:
        revision = self.feeder.current
        if revision is not None and text.strip():
            frame = sys._getframe(1)
            path = revision.path
            while frame is not None and frame.f_code.co_filename != path:
                frame = frame.f_back  # type: ignore[assignment]
            if frame is not None:
                self.feeder.lines.append((self.tell(), frame.f_lineno))
        return super().write(text)


# What the result of MockConnection.execute() (None, offline) is asked for when a revision reads.
_RESULT_METHODS = frozenset(
    {"scalar", "scalars", "scalar_one", "fetchone", "fetchall", "first", "one", "all", "mappings"}
)


def _hint(exc: BaseException) -> str | None:
    """The fix for the ways revisions written for a live connection fail offline."""
    from sqlalchemy.exc import NoInspectionAvailable

    if isinstance(exc, NoInspectionAvailable):  # sa.inspect(op.get_bind()): nothing to inspect
        return (
            "upgrade() inspects the database (sa.inspect(op.get_bind())), which offline is not "
            "there: branch on context.is_offline_mode() (`from alembic import context`) and "
            "skip the inspection there, or write the revision for the schema it must find"
        )
    if not isinstance(exc, AttributeError):
        return None
    if type(exc.obj).__name__ == "MockConnection":  # op.get_bind(), offline: no driver calls
        return (
            f"op.get_bind() has no {exc.name}() offline: run the SQL with "
            "op.execute(sa.text(...)), which renders offline and runs the same online; for "
            "CONCURRENTLY, inside `with op.get_context().autocommit_block():` (not a "
            "connection of its own, not COMMIT by hand)"
        )
    if exc.obj is None and exc.name in _RESULT_METHODS:  # execute() returns None offline
        return (
            "upgrade() reads data through op.get_bind(), which offline returns nothing: "
            "branch on context.is_offline_mode() (`from alembic import context`) and skip "
            "the read there, or move the data change into its own revision"
        )
    return None


def _line_in(exc: BaseException, path: str) -> int | None:
    """The innermost line of `path` that the error's traceback passed through."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    return lines[-1] if lines else None


def _apply(heads: tuple[str, ...], revision: Script) -> tuple[str, ...]:
    """The heads after `revision` is applied: its parents leave, it joins."""
    down = revision.down_revision
    downs = (down,) if isinstance(down, str) else tuple(down or ())
    return (*(head for head in heads if head not in downs), revision.revision)


def _engine_names(cfg: Config | None) -> list[str | None]:
    names = cfg.get_main_option("databases") if cfg is not None else None
    if not names:
        return [None]
    return [name.strip() for name in names.split(",") if name.strip()]


@contextlib.contextmanager
def _no_connections() -> Iterator[None]:
    """Refuse every SQLAlchemy connection (sync or async) made meanwhile, before any I/O."""

    def refuse(*_args: Any) -> None:
        raise ConnectAttempt()

    event.listen(Dialect, "do_connect", refuse)
    try:
        yield
    finally:
        event.remove(Dialect, "do_connect", refuse)


@contextlib.contextmanager
def _captured_output() -> Iterator[None]:
    """env.py's prints and its logging (fileConfig binds sys.stderr now) stay out of the report.

    fileConfig() also disables every logger that existed before it and replaces their handlers:
    the process's logging is put back as it was afterwards (lint may run inside another program).
    """
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    saved = [
        (logger, logger.disabled, logger.level, list(logger.handlers), logger.propagate)
        for logger in loggers
        if isinstance(logger, logging.Logger)
    ]
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        for logger, disabled, level, handlers, propagate in saved:
            logger.disabled, logger.level, logger.propagate = disabled, level, propagate
            logger.handlers[:] = handlers


def display_path(path: str) -> str:
    """Relative to the working folder when it is below it (what a CI log shows best)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def one_line(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit: it called sys.exit({exc.code!r})"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
