"""The read-only report for a person at a shell (text) or a machine (JSON).

Read-only means: no lock taken, no version table created, nothing written, no transaction left
open. Reads run in short read-only transactions whose limits are transaction-local, so nothing
stays on a server session a pooler hands to someone else.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from prosaas_migrate import __version__, config
from prosaas_migrate.errors import CheckCode, ConfigError, MigrateError

if TYPE_CHECKING:
    from prosaas_migrate.schema import Reader

READ_TIMEOUT_MS = 5000  # a report must never hang on a busy server
POOLER_PROBE_SECONDS = 2.0  # the pooler probe's wait for a second server session


def gather(
    environ: Mapping[str, str],
    *,
    dotenv_names: set[str],
    config_option: str | None,
    dotenv_error: str | None = None,
) -> dict[str, Any]:
    """Build the whole report; each section carries its own error instead of failing."""
    bad = config.problems(environ)
    # Bad variables fall back to their defaults here so the other sections can still be shown;
    # each section that depends on one reports it instead of pretending.
    settings = config.load(
        {k: v for k, v in environ.items() if k not in bad}, config_option=config_option
    )
    report: dict[str, Any] = {
        "version": __version__,
        "configuration": _configuration(environ, bad, dotenv_names, settings, dotenv_error),
    }
    report["alembic"], reader = _alembic(settings, bad)
    report["database"], conn = _database(settings, bad, reader, config.url_variable(environ))
    try:
        report["revisions"], table = _revisions(conn, reader)
        report["revisions"]["invalid_indexes"] = _invalid_indexes(
            conn, reader.alembic[1] if reader is not None else None, report["revisions"]
        )
        report["lock"] = _lock(conn, settings, bad, table)
    finally:
        if conn is not None:
            conn.close()
    report["lint"] = _lint(reader.alembic[1] if reader is not None else None, report["revisions"])
    return report


def exit_code(report: Mapping[str, Any], *, check: bool) -> CheckCode:
    """0; with --check, the CheckCode table: never 1 ("pending") for "could not tell"."""
    if not check:
        return CheckCode.AT_HEAD
    if (
        report["configuration"]["errors"]
        or report["alembic"]["error"]
        or report["database"]["rejected"]
    ):
        return CheckCode.MISCONFIGURED
    revisions = report["revisions"]
    if not report["database"]["reachable"] or revisions["error"] or revisions["at_head"] is None:
        return CheckCode.UNKNOWN
    if revisions["unknown"]:
        return CheckCode.AHEAD
    return CheckCode.AT_HEAD if revisions["at_head"] else CheckCode.PENDING


def _configuration(
    environ: Mapping[str, str],
    bad: Mapping[str, ConfigError],
    dotenv_names: set[str],
    settings: config.Settings,
    dotenv_error: str | None,
) -> dict[str, Any]:
    from prosaas_migrate import conninfo

    rows = []
    url_in_use = config.url_variable(environ)
    for setting in config.SETTINGS:
        value = config.value_of(environ, setting.name)
        source = ".env" if setting.name in dotenv_names else "environment"
        if value is None:
            value, source = setting.default, "default" if setting.default is not None else "unset"
        if setting.name == "ALEMBIC_CONFIG" and settings.alembic_config_source == "--config":
            value, source = settings.alembic_config, "--config"
        if setting.secret and value is not None:
            value = conninfo.redact(value)
        note = None
        if (
            setting.name in config.URL_SETTINGS
            and value is not None
            and url_in_use is not None
            and _twin_base(setting.name) != _twin_base(url_in_use)
        ):
            note = f"not used for migrating: {url_in_use} wins"
        error = bad.get(setting.name)
        rows.append(
            {
                "name": setting.name,
                "value": value,
                "source": source,
                "error": error and str(error),
                "note": note,
                "meaning": setting.meaning.replace("`", ""),
            }
        )
    decision_error = next((str(bad[name]) for name in config.RUN_VARIABLES if name in bad), None)
    errors = [str(error) for error in bad.values()]
    if dotenv_error:
        errors.insert(0, dotenv_error)
    return {
        "settings": rows,
        "run": {
            "migrate": None if decision_error else settings.run,
            "decided_by": settings.decided_by,
            "value": settings.decided_value,
            "error": decision_error,
        },
        "dotenv_error": dotenv_error,
        "errors": errors,
    }


def _twin_base(name: str) -> str:
    """DATABASE_URL for DATABASE_URL_FILE: a variable and its _FILE twin are one setting."""
    return name.removesuffix(config.FILE_SUFFIX)


def _alembic(
    settings: config.Settings, bad: Mapping[str, ConfigError]
) -> tuple[dict[str, Any], Reader | None]:
    """The project, and a Reader for it when the URL to migrate with is usable too."""
    from prosaas_migrate.schema import Reader, Target, target

    section: dict[str, Any] = {
        "config": settings.alembic_config,
        "config_source": settings.alembic_config_source,
        "script_location": None,
        "fast_path": None,
        "error": None,
    }
    from prosaas_migrate import revisions

    try:
        project = revisions.read_project(settings.alembic_config, settings.alembic_config_source)
    except ConfigError as exc:
        section["error"] = str(exc)
        return section, None
    section["script_location"] = project.script_location
    section["fast_path"] = project.unsure is None
    try:
        goal = target(settings)
    except ConfigError as exc:
        if exc.variable.startswith("sqlalchemy.url in ["):
            section["error"] = str(exc)  # a multidb engine without a usable URL
            return section, None
        # No usable URL: the scripts can still be read (the Database section says why).
        goal = Target(project, None, {}, revisions.read_graph(project))
    reader = Reader(goal)
    try:
        reader.alembic  # noqa: B018 - loads every revision file now, so errors land here
    except MigrateError as exc:
        section["error"] = str(exc)
        return section, None
    return section, reader


def _database(
    settings: config.Settings,
    bad: Mapping[str, ConfigError],
    reader: Reader | None,
    in_use: str | None,  # the URL variable run would migrate with, even when it is invalid
) -> tuple[dict[str, Any], Any]:
    section: dict[str, Any] = {
        "reachable": False,
        "url": None,
        "url_source": None,
        "server_version": None,
        "pooler": None,
        "rejected": False,
        "error": None,
    }
    try:
        if in_use is not None and in_use in bad:
            raise bad[in_use]
        ini_url = reader.goal.project.url if reader is not None else None
        info = config.migration_conninfo(settings, ini_url)
    except ConfigError as exc:
        section["error"] = f"not checked: {exc}"
        return section, None
    section["url"] = info.display
    section["url_source"] = settings.database_url_source or "sqlalchemy.url"
    import psycopg

    from prosaas_migrate import database

    try:
        conn = database.connect(info, deadline=time.monotonic())
    except MigrateError as exc:
        section["error"] = getattr(exc, "reason", str(exc))
        if meaning := getattr(exc, "meaning", None):
            section["rejected"] = True
            section["error"] += f" ({meaning}: retrying cannot help)"
        return section, None
    try:
        with database.answering_within(READ_TIMEOUT_MS / 1000):
            row = conn.execute("SELECT current_setting('server_version')").fetchone()
    except (psycopg.Error, database.NoAnswer) as exc:
        conn.close()
        section["error"] = database.one_line(exc, info)
        return section, None
    section.update(reachable=True, server_version=str(row[0]) if row else None)
    section["pooler"] = _pooler(conn, info)
    return section, conn


def _pooler(conn: Any, info: Any) -> str | None:
    """Why `run` would refuse to migrate through this URL's pooler, or None. The probe opens
    two empty transactions on a read-only session and leaves nothing on any server session."""
    import psycopg

    from prosaas_migrate import database

    try:
        with database.answering_within(POOLER_PROBE_SECONDS + 2):
            return database.transaction_pooling(conn, info, timeout=POOLER_PROBE_SECONDS)
    except (psycopg.Error, database.NoAnswer) as exc:
        return f"could not tell whether a pooler keeps sessions ({database.one_line(exc, info)})"


def _revisions(conn: Any, reader: Reader | None) -> tuple[dict[str, Any], Any]:
    section: dict[str, Any] = {
        "current": None,
        "heads": None,
        "pending": None,
        "at_head": None,
        "unknown": None,
        "error": None,
    }
    if reader is None:
        return section, None
    from prosaas_migrate import migrations

    _, script, heads = reader.alembic
    section["heads"] = list(heads)
    if conn is None:
        return section, None
    import psycopg

    from prosaas_migrate import database

    try:
        with database.answering_within(READ_TIMEOUT_MS / 1000 + 1):
            position = reader.position(conn, READ_TIMEOUT_MS)
    except (MigrateError, psycopg.Error, database.NoAnswer) as exc:
        section["error"] = str(exc) if isinstance(exc, MigrateError) else _one_line(exc)
        return section, None
    section["current"] = list(position.current)
    section["unknown"] = list(position.unknown)
    if position.unknown:
        section["at_head"] = False
        return section, position.table
    try:
        pending = migrations.pending(script, position.current)
    except Exception as exc:  # overlapping version rows, say: Alembic cannot tell either
        section["error"] = f"cannot compare with the scripts: {_one_line(exc)}"
        return section, position.table
    section["pending"] = [{"revision": s.revision, "message": s.doc} for s in pending]
    section["at_head"] = position.at_head
    return section, position.table


# Invalid indexes (what a failed or interrupted CREATE INDEX CONCURRENTLY leaves) on the given
# tables, each named as the rendered SQL names it (schema or NULL for the search_path).
_INVALID_INDEXES_SQL = """
SELECT i.indexrelid::regclass::text, i.indrelid::regclass::text
  FROM pg_index i
 WHERE NOT i.indisvalid
   AND i.indrelid IN (
       SELECT to_regclass(CASE WHEN s IS NULL THEN quote_ident(t)
                               ELSE quote_ident(s) || '.' || quote_ident(t) END)
         FROM unnest(%s::text[], %s::text[]) AS n(s, t))
 ORDER BY 2, 1
"""


def _invalid_indexes(
    conn: Any, script: Any, revisions: Mapping[str, Any]
) -> list[dict[str, str]] | None:
    """Invalid indexes on the tables the pending revisions touch (a failed concurrent build
    left them: the next start drops and rebuilds one it builds); None when it cannot tell."""
    if conn is None or script is None or not revisions["pending"]:
        return None if revisions["pending"] is None else []
    import psycopg

    from prosaas_migrate import database, lint, locks, offline

    try:
        selected = [script.get_revision(item["revision"]) for item in revisions["pending"]]
        rendering = offline.render(
            None, script, [s for s in selected if s], starting_heads=revisions["current"]
        )
        tables = {
            (lock.schema, lock.table)
            for statement in lint.statements(rendering)
            if statement.node is not None and statement.revision is not None
            for lock in locks.statement_locks(statement.node).locks
            if lock.relkind == locks.TABLE
        }
        if not tables:
            return []
        schemas, names = (
            [s for s, _ in sorted(tables, key=str)],
            [t for _, t in sorted(tables, key=str)],
        )
        with (
            database.answering_within(READ_TIMEOUT_MS / 1000 + 1),
            database.bounded(conn, READ_TIMEOUT_MS),
        ):
            rows = conn.execute(_INVALID_INDEXES_SQL, [schemas, names]).fetchall()
    except (psycopg.Error, database.NoAnswer, MigrateError):
        return None
    return [{"index": str(index), "table": str(table)} for index, table in rows]


def _lock(
    conn: Any, settings: config.Settings, bad: Mapping[str, ConfigError], table: Any
) -> dict[str, Any]:
    from prosaas_migrate import database

    key = config.lock_key(settings, database.table_name(table or database.DEFAULT_TABLE))
    section: dict[str, Any] = {
        "key": str(key),  # a 64-bit identifier: JSON numbers lose precision above 2**53
        "key_source": settings.lock_key_source,
        "held": None,
        "holder": None,
        "error": None,
    }
    if "MIGRATION_LOCK_KEY" in bad:
        section.update(
            key=None, key_source="MIGRATION_LOCK_KEY", error=str(bad["MIGRATION_LOCK_KEY"])
        )
        return section
    if conn is None:
        section["error"] = "database unreachable"
        return section
    import psycopg

    from prosaas_migrate import lock

    try:
        with (
            database.answering_within(READ_TIMEOUT_MS / 1000 + 1),
            database.bounded(conn, READ_TIMEOUT_MS),
        ):
            holder = lock.holder(conn, key)
    except (MigrateError, psycopg.Error, database.NoAnswer) as exc:
        section["error"] = str(exc) if isinstance(exc, MigrateError) else _one_line(exc)
        return section
    section["held"] = holder is not None
    if holder is not None:
        section["holder"] = holder.as_dict()
    return section


def _lint(script: Any, revisions: Mapping[str, Any]) -> dict[str, Any] | None:
    """`lint` on the pending revisions (rendered offline, no env.py); None when none are known."""
    if script is None or not revisions["pending"]:
        return None
    from prosaas_migrate import lint

    pending = [item["revision"] for item in revisions["pending"]]
    try:
        found = lint.findings_for(script, pending, current=revisions["current"]).as_dict()
    except Exception as exc:  # the report never fails over one of its sections
        return {**dict.fromkeys(lint.Report().as_dict()), "error": _one_line(exc)}
    return {**found, "error": None}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- rendering --------------------------------------------------------------------------------


def render_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False)


def render_text(report: Mapping[str, Any], *, style: Callable[..., str]) -> str:
    """Aligned sections; `style` is click.style (or a no-op) so colour stays the caller's call."""
    ok = partial(style, fg="green")
    warn = partial(style, fg="yellow")
    bad = partial(style, fg="red")
    out: list[str] = []
    conf = report["configuration"]
    label_width = max(len(s["name"]) for s in conf["settings"]) + 2

    def heading(title: str) -> None:
        if out:
            out.append("")
        out.append(style(title, bold=True))

    def row(label: str, value: str) -> None:
        out.append(f"  {label:<{label_width}} {value}")

    heading("Configuration")
    if conf["dotenv_error"]:
        row(".env", bad(conf["dotenv_error"]))
    values = ["-" if s["value"] is None else str(s["value"]) for s in conf["settings"]]
    width = max(len(v) for v in values)
    for setting, value in zip(conf["settings"], values, strict=True):
        text = f"{value:<{width}}  {setting['source']}"
        if setting["note"]:
            text += f"  ({setting['note']})"
        row(setting["name"], bad(f"{text}  ✗ {setting['error']}") if setting["error"] else text)
    run = conf["run"]
    if run["error"]:
        row("run decision", bad(f"unknown: {run['error']}"))
    else:
        why = {
            "default": "default: none of the variables above is set",
            "RUN_MIGRATIONS_ON_START": f"legacy RUN_MIGRATIONS_ON_START={run['value']}",
        }.get(run["decided_by"], f"{run['decided_by']}={run['value']}")
        row("run decision", f"{'migrate' if run['migrate'] else 'skip'} ({why})")

    alembic = report["alembic"]
    heading("Alembic")
    row("config file", f"{alembic['config']} ({alembic['config_source']})")
    row("script location", alembic["script_location"] or "-")
    if alembic["fast_path"] is not None:
        row("fast path", "yes" if alembic["fast_path"] else "no (Alembic reads this project)")
    if alembic["error"]:
        row("error", bad(alembic["error"]))

    db = report["database"]
    heading("Database")
    if db["url"]:
        row("url", f"{db['url']} ({db['url_source']})")
    row("reachable", ok("yes") if db["reachable"] else bad(f"no: {db['error']}"))
    if db["server_version"]:
        row("server version", db["server_version"])
    if db["pooler"]:
        row(
            "pooler",
            warn(
                f"{db['pooler']}: run refuses to migrate through it (exit 2 when a revision "
                "is pending); set MIGRATION_DATABASE_URL to a direct connection"
            ),
        )

    revisions = report["revisions"]
    heading("Revisions")
    row("current", _listed(revisions["current"], empty="base (no version table)"))
    row("heads", _listed(revisions["heads"], empty="-"))
    if revisions["error"]:
        row("pending", bad(f"unknown: {revisions['error']}"))
    elif revisions["unknown"]:
        row(
            "pending",
            warn(
                f"the database is ahead of these scripts: {', '.join(revisions['unknown'])} "
                "is not among them (a newer image migrated; a rollback deploy?)"
            ),
        )
    elif revisions["pending"] is not None:
        pending = revisions["pending"]
        row("pending", ok("none: at head") if not pending else warn(str(len(pending))))
        for item in pending:
            out.append(
                f"    {item['revision']:<{label_width - 2}} {item['message'] or ''}".rstrip()
            )
    for invalid in revisions.get("invalid_indexes") or ():
        row(
            "invalid index",
            warn(
                f"{invalid['index']} on {invalid['table']} (a failed concurrent build left it; "
                "run drops it before building it again)"
            ),
        )

    lock = report["lock"]
    heading("Lock")
    key = "-" if lock["key"] is None else f"{lock['key']} ({lock['key_source']})"
    row("key", key)
    if lock["error"]:
        row("state", bad(lock["error"]))
    elif lock["held"]:
        h = lock["holder"]
        row("state", warn("held"))
        row("holder", f"pid {h['pid']} ({h['application_name'] or 'no application_name'})")
        row("client address", h["client_addr"] or "local socket")
        if h["connected_since"] is None:
            row("since", "hidden (another role's session)")
        else:
            row("since", f"{h['connected_since']} ({h['connected_seconds']:.0f}s)")
        state_age = "" if h["state_seconds"] is None else f", for {h['state_seconds']:.0f}s"
        row("state of holder", f"{h['state'] or 'unknown'}{state_age}")
    else:
        row("state", ok("free"))

    checked = report.get("lint")
    heading("Lint")
    if checked is None:
        row("pending revisions", "none" if revisions["pending"] == [] else "unknown")
    elif checked["error"]:
        row("error", bad(checked["error"]))
    else:
        found = checked["findings"]
        row("pending revisions", str(checked["revisions_checked"]))
        row("findings", ok("none") if not found else warn(str(len(found))))
        for item in found:
            line = f"    {item['revision']:<{label_width - 2}} {item['rule']}: {item['statement']}"
            out.append(line.rstrip(": "))
        if checked["allowed"]:
            row("allowed by a comment", str(checked["allowed"]))
    return "\n".join(out)


def _listed(values: list[str] | None, *, empty: str) -> str:
    if values is None:
        return "unknown"
    return ", ".join(values) if values else empty
