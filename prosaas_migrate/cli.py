"""Click wiring only: options, .env loading, domain errors -> one line and an exit code."""

from __future__ import annotations

import io
import os
import sys
from contextlib import suppress
from typing import NoReturn, TextIO

import click

from prosaas_migrate import __version__, config, logs, runner
from prosaas_migrate.errors import (
    CHECK_MEANINGS,
    EXIT_MEANINGS,
    CheckCode,
    DatabaseAhead,
    DotenvUnreadable,
    HeadNotReached,
    Interrupted,
    LockLost,
    LockTimeout,
    MigrateError,
    MigrationFailed,
    TransactionPooling,
)


def load_dotenv_file(environ: dict[str, str] | os._Environ[str], path: str) -> set[str]:
    """Add .env's variables that are not really set (nor, for a URL, its `_FILE` twin); return
    the names it supplied.

    Raises DotenvUnreadable (one line) when the file exists but cannot be read.
    """
    if not os.path.isfile(path):
        return set()
    from dotenv import dotenv_values

    try:
        values = dotenv_values(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DotenvUnreadable(path, " ".join(str(exc).split())) from None
    supplied = {
        name: value
        for name, value in values.items()
        if value is not None and name not in environ and not _twin_really_set(environ, name)
    }
    environ.update(supplied)
    return set(supplied)


def _twin_really_set(environ: dict[str, str] | os._Environ[str], name: str) -> bool:
    """A URL variable or its `_FILE` twin is one setting: the .env's half of it must not turn
    the half that is really set into a 'both set' error (or reach the service beside it)."""
    if name not in config.URL_SETTINGS:
        return False
    base = name.removesuffix(config.FILE_SUFFIX)
    twin = base if name != base else base + config.FILE_SUFFIX
    return config.value_of(environ, twin) is not None


def _dotenv_path() -> str:
    return os.path.join(os.getcwd(), ".env")


def _tolerate_unencodable_output() -> None:
    # Under LC_ALL=C or PYTHONIOENCODING=ascii an emoji would raise; print '?' instead.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")


config_option = click.option(
    "--config",
    "-c",
    "config_path",
    metavar="PATH",
    help="Alembic ini file (default: $ALEMBIC_CONFIG, then ./alembic.ini).",
)


def _plain(text: str) -> str:
    return text.replace("`", "")  # the table's meanings are Markdown for the README


class _RunCommand(click.Command):
    """`run`, whose help lists every setting and exit code from the tables in the code: the
    README is not in the image, so inside a container this is where a user looks."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # click consumes `--`; what follows it is the service, even when it starts with a dash.
        ctx.meta["after_dashdash"] = args[args.index("--") + 1 :] if "--" in args else None
        return super().parse_args(ctx, args)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [
            (s.name, f"{_plain(s.meaning)} [default: {s.default or 'unset'}]")
            for s in config.SETTINGS
        ]
        with formatter.section("Configuration (environment; a ./.env file fills in what is unset)"):
            formatter.write_dl(rows)
        with formatter.section("Exit codes (before exec; then the service's own)"):
            formatter.write_dl([(str(int(c)), _plain(m)) for c, m in EXIT_MEANINGS.items()])


class _StatusCommand(click.Command):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Exit codes with --check"):
            formatter.write_dl([(str(int(c)), _plain(m)) for c, m in CHECK_MEANINGS.items()])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prosaas-migrate")
def main() -> None:
    """Run Alembic migrations from one designated container, then start its service.

    Configuration comes from the environment (and a .env file in the working folder); see
    `prosaas-migrate run --help` and the README.

    \b
    Example:
        RUN_MIGRATIONS=1 prosaas-migrate run -- gunicorn app:app
    """
    _tolerate_unencodable_output()


@main.command(
    cls=_RunCommand,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@config_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(config_path: str | None, command: tuple[str, ...]) -> NoReturn:
    """Migrate under the advisory lock (when enabled), then exec COMMAND.

    Only the container with RUN_MIGRATIONS=1 (or the legacy RUN_MIGRATIONS_ON_START=1, or
    SERVICE_ROLE=api) migrates; every other one execs COMMAND at once. A lock that cannot be
    had within MIGRATION_LOCK_WAIT_SECONDS is skipped, never a crash. Without COMMAND, exit with
    the outcome (a one-off migration job).

    \b
    Example:
        RUN_MIGRATIONS=1 DATABASE_URL=postgresql://app@db/app \\
            prosaas-migrate run -- gunicorn app:app
    """
    after_dashdash = click.get_current_context().meta.get("after_dashdash")
    if command and command[0].startswith("-") and list(command) != after_dashdash:
        # Unknown options land in COMMAND; after `--` a dash is the service's own business.
        message = f"no such option: {command[0]} (put the service after --)"
        with suppress(MigrateError):
            if config.log_format(os.environ) == "json":  # then every line is JSON, this too
                logs.configure("json")
                logs.error(message)
                sys.exit(2)
        raise click.UsageError(message)
    try:
        # The format first, so that every later line, config errors included, is in it.
        logs.configure(config.log_format(os.environ))
        load_dotenv_file(os.environ, _dotenv_path())
        logs.configure(config.log_format(os.environ))  # .env may set it
        for name, suggestion in config.unknown_variables(os.environ):
            logs.unknown_variable(name, suggestion)
        settings = config.load(os.environ, config_option=config_path)
        code = runner.run(settings, command, hostname=_hostname())
    except MigrateError as exc:
        _report(exc)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        logs.interrupted(exc.signal_name, after_commit=exc.after_commit, partly=exc.partly)
        sys.exit(exc.exit_code)
    sys.exit(code)


@main.command(cls=_StatusCommand)
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option(
    "--check",
    is_flag=True,
    help="Exit with what it found (see below), for CI jobs and health checks.",
)
def status(config_path: str | None, as_json: bool, check: bool) -> NoReturn:
    """Show configuration, revisions and the lock, without changing anything.

    Read-only: takes no lock, creates no version table, writes nothing. Safe in any container,
    with or without a database, and with a bad configuration (each error is shown where it is).

    \b
    Example:
        docker compose exec worker prosaas-migrate status
        prosaas-migrate status --json --check   # for CI and health checks
    """
    from prosaas_migrate import status as report_status

    try:
        dotenv_names, dotenv_error = load_dotenv_file(os.environ, _dotenv_path()), None
    except DotenvUnreadable as exc:  # reported in its own section, like every other problem
        dotenv_names, dotenv_error = set(), str(exc)
    try:
        report = report_status.gather(
            os.environ,
            dotenv_names=dotenv_names,
            config_option=config_path,
            dotenv_error=dotenv_error,
        )
    except Exception:
        if not check:
            raise
        # A crash is not "pending": Python's own exit status for it, 1, would say so.
        import traceback

        traceback.print_exc()
        logs.error("status could not finish (the traceback above is a bug): could not tell")
        sys.exit(CheckCode.UNKNOWN)
    if as_json:
        click.echo(report_status.render_json(report))
    else:
        # click drops colour when stdout is not a terminal; NO_COLOR drops it everywhere.
        color = False if os.environ.get("NO_COLOR") else None
        click.echo(report_status.render_text(report, style=click.style), color=color)
    sys.exit(report_status.exit_code(report, check=check))


@main.command("worker-trace")
@click.argument("source", default="-", metavar="[FILE|-]", type=click.File("r", errors="replace"))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option(
    "--loop-threshold",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Picks without a download that make a recording loop.",
)
@click.option(
    "--leak-after",
    metavar="DURATION",
    default="10m",
    show_default=True,
    help="A slot still held at the end, acquired longer ago than this by the log's own "
    "timestamps, is leaked. Numbers with the units h, m and s, each at most once and largest "
    "first (90s, 10m, 1h30m, 1.5h), from 0.001s to 720h.",
)
def worker_trace(source: TextIO, as_json: bool, loop_threshold: int, leak_after: str) -> NoReturn:
    """Find recording loops, leaked slots and repeated failures in worker logs.

    Reads the WORKER_* events (text or JSON lines, also inside ECS or Docker json-file JSON,
    mixed with anything else, with or without the prefixes, timestamps and colours of
    `docker compose logs` or `kubectl logs`) from FILE or standard input, streaming. Exits 1
    when the log proves a loop, a leaked slot or a double release, so it can gate a CI job;
    jobs in flight at the end or begun before the log are counted, not failed, and events out
    of time order (one replica's log after another's) are counted, not judged.

    \b
    Example:
        docker compose logs --since 1h worker | prosaas-migrate worker-trace
        kubectl logs -l app=worker --prefix --timestamps --since 1h | prosaas-migrate worker-trace
        prosaas-migrate worker-trace --json --leak-after 30m worker.log
    """
    from prosaas_migrate import worker_trace as trace

    try:
        held_too_long = trace.parse_duration(leak_after)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--leak-after'") from None
    report = (
        trace.Trace(loop_threshold=loop_threshold, leak_after=held_too_long).read(source).report()
    )
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(trace.render_text(report))
    sys.exit(1 if trace.problems_found(report) else 0)


@main.command()
@config_option
@click.option("--since", metavar="REV", help="Only the revisions after REV (what a branch adds).")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json", "github"]),
    default=None,
    help="text (the default), json, or github: GitHub Actions annotations at file and line.",
)
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
def lint(
    config_path: str | None, since: str | None, output_format: str | None, as_json: bool
) -> NoReturn:
    """Find unsafe DDL in revisions: long locks on busy tables, changes that break running code.

    Renders each revision's SQL with Alembic's offline mode (no database, no DATABASE_URL: a CI
    gate) and checks it with PostgreSQL's own parser. Exits 0 when nothing is found, 1 when
    something is, 2 on a usage or configuration error. A revision silences rules with a
    comment in its own file (rule names separated by commas or blanks; a reason after ':',
    '--' or ' - '):

    \b
        # prosaas-migrate: allow RULE[, RULE...] [: reason]

    \b
    Example:
        prosaas-migrate lint --since origin-main-head
        prosaas-migrate lint --json > lint.json
        prosaas-migrate lint --format github --since "$origin_main_head"
    """
    from prosaas_migrate import lint as checks
    from prosaas_migrate import revisions

    if as_json and output_format not in (None, "json"):
        raise click.UsageError(f"--json and --format {output_format} contradict each other")
    output_format = "json" if as_json else output_format or "text"
    try:
        # Only the ini's location matters here: ALEMBIC_CONFIG alone, really set or from .env
        # as for `run`, so that a variable meant for `run` (even an invalid one) cannot fail a
        # CI job that merely lints.
        ini_only = {k: v for k, v in os.environ.items() if k == "ALEMBIC_CONFIG"}
        load_dotenv_file(ini_only, _dotenv_path())
        ini_only = {k: v for k, v in ini_only.items() if k == "ALEMBIC_CONFIG"}
        settings = config.load(ini_only, config_option=config_path)
        source = settings.alembic_config_source
        variable = checks.DEFAULT_CONFIG if source == "default" else source
        project = revisions.read_project(settings.alembic_config, variable)
        report = checks.lint_project(project, variable, since=since)
    except MigrateError as exc:
        logs.error(str(exc))
        sys.exit(exc.exit_code)
    if output_format == "json":
        click.echo(checks.render_json(report))
    elif output_format == "github":
        click.echo(checks.render_github(report))
    else:
        color = False if os.environ.get("NO_COLOR") else None
        click.echo(checks.render_text(report, style=click.style), color=color)
    sys.exit(checks.exit_code(report))


class _PlanCommand(click.Command):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Exit codes (those of status --check)"):
            formatter.write_dl([(str(int(c)), _plain(m)) for c, m in CHECK_MEANINGS.items()])


@main.command(cls=_PlanCommand)
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def plan(config_path: str | None, as_json: bool) -> NoReturn:
    """Show what this deploy would run here: each pending statement and what it locks.

    Reads where the database stands (read-only, as status: no lock, no version table, nothing
    written), renders the pending revisions offline (as lint) and prints, revision by
    revision, each statement, whether it runs in a transaction or outside one (an
    autocommit_block), the lock it takes on which table with the table's estimated rows and
    size from the catalog, and lint's findings. Exits as status --check does.

    \b
    Example:
        docker compose exec worker prosaas-migrate plan
        prosaas-migrate plan --json > plan.json
    """
    from prosaas_migrate import plan as planned

    try:
        load_dotenv_file(os.environ, _dotenv_path())
        result = planned.make(os.environ, config_option=config_path)
    except DotenvUnreadable as exc:
        result = planned.Plan(CheckCode.MISCONFIGURED, error=str(exc))
    if as_json:
        click.echo(planned.render_json(result))
    elif result.error is not None:
        logs.error(result.error)
    else:
        color = False if os.environ.get("NO_COLOR") else None
        click.echo(planned.render_text(result, style=click.style), color=color)
    sys.exit(planned.exit_code(result))


def _report(exc: MigrateError) -> None:
    if isinstance(exc, MigrationFailed):
        logs.migration_failed(exc.revision, exc.cause, exc.rolled_back, exc.committed, exc.partly)
    elif isinstance(exc, LockLost):
        logs.lock_lost(exc.key, exc.reason, exc.consequence)
    elif not isinstance(exc, HeadNotReached | TransactionPooling | DatabaseAhead | LockTimeout):
        logs.error(str(exc))  # the four above are logged, in full, where they happen


def _hostname() -> str:
    return os.uname().nodename  # what socket.gethostname() returns, without importing socket
