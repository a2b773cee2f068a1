"""The read-only report for a person at a shell (text) or a machine (JSON).

Read-only means: no lock taken, no version table created, nothing written, no transaction left
open. The connection runs in autocommit with default_transaction_read_only on, as a second guard.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from prosaas_migrate import __version__, config
from prosaas_migrate.errors import ConfigError, MigrateError

SETTING_VARIABLES = config.KNOWN_VARIABLES
_DEFAULTS = {
    "MIGRATION_LOCK_WAIT_SECONDS": str(config.DEFAULT_LOCK_WAIT_SECONDS),
    "MIGRATION_STATEMENT_TIMEOUT": config.DEFAULT_STATEMENT_TIMEOUT,
    "MIGRATION_LOCK_KEY": str(config.DEFAULT_LOCK_KEY),
    "MIGRATION_WAIT_FOR_HEAD_SECONDS": str(config.DEFAULT_WAIT_FOR_HEAD_SECONDS),
    "MIGRATION_LOG_FORMAT": "text",
    "ALEMBIC_CONFIG": config.DEFAULT_ALEMBIC_CONFIG,
}
_STATUS_STATEMENT_TIMEOUT_MS = 5000  # a report must never hang on a busy server


def gather(
    environ: Mapping[str, str],
    *,
    dotenv_names: set[str],
    config_option: str | None,
    hostname: str,
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
        "configuration": _configuration(environ, bad, dotenv_names, config_option, settings),
    }
    report["alembic"], ini, script = _alembic(settings)
    report["database"], conn = _database(settings, bad, ini, hostname)
    try:
        report["revisions"] = _revisions(conn, script)
        report["lock"] = _lock(conn, settings, bad)
    finally:
        if conn is not None:
            conn.close()
    report["lint"] = _lint(script, report["revisions"])
    return report


def exit_code(report: Mapping[str, Any], *, check: bool) -> int:
    """0; with --check: 2 for a bad configuration, 3 unreachable, 1 pending migrations."""
    if not check:
        return 0
    if report["configuration"]["errors"]:
        return 2
    if not report["database"]["reachable"]:
        return 3
    revisions = report["revisions"]
    return 1 if revisions["error"] or not revisions["at_head"] else 0


def _configuration(
    environ: Mapping[str, str],
    bad: Mapping[str, ConfigError],
    dotenv_names: set[str],
    config_option: str | None,
    settings: config.Settings,
) -> dict[str, Any]:
    rows = []
    for name in SETTING_VARIABLES:
        value = environ.get(name) or None
        source = ".env" if name in dotenv_names else "environment"
        if value is None:
            value, source = _DEFAULTS.get(name), "default" if name in _DEFAULTS else "unset"
        if name == "ALEMBIC_CONFIG" and config_option is not None:
            value, source = config_option, "--config"
        if value is not None and name.endswith("DATABASE_URL"):
            value = config.redact_url(value)
        error = bad.get(name)
        rows.append({"name": name, "value": value, "source": source, "error": error and str(error)})
    decision_error = next((str(bad[name]) for name in config.RUN_VARIABLES if name in bad), None)
    return {
        "settings": rows,
        "run": {
            "migrate": None if decision_error else settings.run,
            "decided_by": settings.decided_by,
            "value": settings.decided_value,
            "error": decision_error,
        },
        "errors": [str(error) for error in bad.values()],
    }


def _alembic(settings: config.Settings) -> tuple[dict[str, Any], Any, Any]:
    section: dict[str, Any] = {
        "config": settings.alembic_config,
        "config_source": settings.alembic_config_source,
        "script_location": None,
        "error": None,
    }
    from prosaas_migrate import revisions

    try:
        ini = revisions.read_ini(settings.alembic_config, settings.alembic_config_source)
    except ConfigError as exc:
        section["error"] = str(exc)
        return section, None, None
    section["script_location"] = ini.script_location
    try:
        from prosaas_migrate import migrations

        script = migrations.script_directory(migrations.load_config(ini))
        migrations.heads(script)  # loads every revision file now, so errors land here
    except Exception as exc:  # a revision file that does not import: report, never crash
        section["error"] = str(exc) if isinstance(exc, MigrateError) else _one_line(exc)
        return section, ini, None
    return section, ini, script


def _database(
    settings: config.Settings, bad: Mapping[str, ConfigError], ini: Any, hostname: str
) -> tuple[dict[str, Any], Any]:
    section: dict[str, Any] = {
        "reachable": False,
        "url": None,
        "url_source": None,
        "server_version": None,
        "error": None,
    }
    broken = [bad[name] for name in config.URL_VARIABLES if name in bad]
    try:
        if broken:
            raise broken[0]
        url = config.migration_url(settings, ini.url if ini else None)
    except ConfigError as exc:
        section["error"] = f"not checked: {exc}"
        return section, None
    section["url"] = config.redact_url(url)
    section["url_source"] = settings.database_url_source or "sqlalchemy.url"
    from prosaas_migrate import database

    app_name = database.application_name(hostname)
    try:
        conn = database.connect(url, app_name=app_name, deadline=time.monotonic())
    except MigrateError as exc:
        section["error"] = getattr(exc, "reason", str(exc))
        return section, None
    database.set_session_settings(conn, _STATUS_STATEMENT_TIMEOUT_MS, app_name)
    conn.execute("SELECT set_config('default_transaction_read_only', 'on', false)")
    row = conn.execute("SHOW server_version").fetchone()
    section.update(reachable=True, server_version=str(row[0]) if row else None)
    return section, conn


def _revisions(conn: Any, script: Any) -> dict[str, Any]:
    from prosaas_migrate import database, migrations

    section: dict[str, Any] = {
        "current": None,
        "heads": None if script is None else list(migrations.heads(script)),
        "pending": None,
        "at_head": None,
        "error": None,
    }
    if conn is None:
        return section
    current = database.current_revisions(conn)
    section["current"] = list(current)
    if script is None:
        return section
    try:
        pending = migrations.pending(script, current)
    except Exception as exc:  # e.g. the database is at a revision this image does not have
        section["error"] = f"cannot compare with the scripts: {_one_line(exc)}"
        return section
    section["pending"] = [{"revision": s.revision, "message": s.doc} for s in pending]
    section["at_head"] = not pending
    return section


def _lock(conn: Any, settings: config.Settings, bad: Mapping[str, ConfigError]) -> dict[str, Any]:
    section: dict[str, Any] = {
        "key": settings.lock_key,
        "key_source": settings.lock_key_source,
        "held": None,
        "holder": None,
        "error": None,
    }
    if "MIGRATION_LOCK_KEY" in bad:
        section.update(key=None, error=str(bad["MIGRATION_LOCK_KEY"]))
        return section
    if conn is None:
        section["error"] = "database unreachable"
        return section
    from prosaas_migrate import lock

    holder = lock.holder(conn, settings.lock_key)
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

    def heading(title: str) -> None:
        if out:
            out.append("")
        out.append(style(title, bold=True))

    def row(label: str, value: str) -> None:
        out.append(f"  {label:<29} {value}")

    conf = report["configuration"]
    heading("Configuration")
    values = ["-" if s["value"] is None else str(s["value"]) for s in conf["settings"]]
    width = max(len(v) for v in values)
    for setting, value in zip(conf["settings"], values, strict=True):
        text = f"{value:<{width}}  {setting['source']}"
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
    if alembic["error"]:
        row("error", bad(alembic["error"]))

    db = report["database"]
    heading("Database")
    if db["url"]:
        row("url", f"{db['url']} ({db['url_source']})")
    row("reachable", ok("yes") if db["reachable"] else bad(f"no: {db['error']}"))
    if db["server_version"]:
        row("server version", db["server_version"])

    revisions = report["revisions"]
    heading("Revisions")
    row("current", _listed(revisions["current"], empty="base (no version table)"))
    row("heads", _listed(revisions["heads"], empty="-"))
    if revisions["error"]:
        row("pending", bad(revisions["error"]))
    elif revisions["pending"] is not None:
        pending = revisions["pending"]
        row("pending", ok("none: at head") if not pending else warn(str(len(pending))))
        for item in pending:
            out.append(f"    {item['revision']:<27} {item['message'] or ''}".rstrip())

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
            out.append(
                f"    {item['revision']:<27} {item['rule']}: {item['statement']}".rstrip(": ")
            )
        if checked["allowed"]:
            row("allowed by a comment", str(checked["allowed"]))
    return "\n".join(out)


def _listed(values: list[str] | None, *, empty: str) -> str:
    if values is None:
        return "unknown"
    return ", ".join(values) if values else empty
