"""Unsafe DDL in Alembic revisions: rules over pglast parse trees of their offline SQL.

A revision is dangerous during a rolling deploy when it holds a strong lock for long on a table
that already has rows, or breaks the image that is still running. Each rule below names the lock
PostgreSQL takes (tests check it against a real server), why it hurts and the safe way to write
it. Statements on a table created earlier in the same revision are exempt from the table rules:
nobody reads it yet. A revision file silences rules with a comment (ALLOW_GRAMMAR below).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import pglast
from pglast import ast
from pglast.enums import (
    AlterTableType,
    BoolExprType,
    ConstrType,
    NullTestType,
    ObjectType,
    ReindexObjectType,
    TransactionStmtKind,
)
from pglast.parser import ParseError, parse_sql_json, scan, split

from prosaas_migrate import history, locks, offline

if TYPE_CHECKING:
    from alembic.script import Script, ScriptDirectory

    from prosaas_migrate.revisions import Project

STATEMENT_WIDTH = 120
ALLOW_GRAMMAR = "# prosaas-migrate: allow RULE[, RULE...] [: reason]"
# What errors name when neither --config nor ALEMBIC_CONFIG chose the config.
DEFAULT_CONFIG = "./alembic.ini (the default; set ALEMBIC_CONFIG or --config)"
_AUTOCOMMIT = "`with op.get_context().autocommit_block():`"


@dataclass(frozen=True)
class Rule:
    """A stable name, the lock the statement takes (None: not a lock problem), why, and the fix."""

    name: str
    lock: str | None
    why: str  # str.format fields: table, column, detail
    hint: str


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            "index-not-concurrent",
            "SHARE",
            "builds the index while holding SHARE on {table}: every INSERT, UPDATE and DELETE "
            "waits for the whole build",
            "CREATE INDEX CONCURRENTLY (op.create_index(..., postgresql_concurrently=True)) "
            f"inside {_AUTOCOMMIT}",
        ),
        Rule(
            "reindex-not-concurrent",
            "SHARE",
            "rebuilds {detail} while holding SHARE on {table} (every INSERT, UPDATE and DELETE "
            "waits) and ACCESS EXCLUSIVE on the index (every query that plans on the table "
            "waits too: the planner opens all of a table's indexes)",
            "REINDEX ... CONCURRENTLY (PostgreSQL 12+) inside "
            f"{_AUTOCOMMIT}: it builds a new copy beside the old one and swaps them",
        ),
        Rule(
            "drop-index-not-concurrent",
            "ACCESS EXCLUSIVE",
            "drops index {detail} while holding ACCESS EXCLUSIVE on {table}: brief, but it "
            "queues behind every running query on the table, and every query after it queues "
            "behind it",
            "DROP INDEX CONCURRENTLY (op.drop_index(..., postgresql_concurrently=True)) inside "
            f"{_AUTOCOMMIT}",
        ),
        Rule(
            "concurrently-in-transaction",
            None,
            "{detail} cannot run inside a transaction block: the migration fails",
            f"run it inside {_AUTOCOMMIT}, which commits before it and begins again after",
        ),
        Rule(
            "required-column-without-default",
            "ACCESS EXCLUSIVE",
            "adds NOT NULL column {column} to {table} without a default: it fails on a table "
            "with rows, and the image still running inserts rows without it",
            "add it nullable (or with a constant DEFAULT), backfill, then enforce NOT NULL "
            "the set-not-null way",
        ),
        Rule(
            "volatile-default",
            "ACCESS EXCLUSIVE",
            "{detail}: PostgreSQL rewrites all of {table} while holding ACCESS EXCLUSIVE, so "
            "reads and writes wait",
            "add the column with no default (or a constant, or now()), then SET DEFAULT for new "
            "rows and backfill the old ones in batches",
        ),
        Rule(
            "column-type-change",
            "ACCESS EXCLUSIVE",
            "changes the type of {table}.{column} {detail}: PostgreSQL rewrites the table and "
            "its indexes while holding ACCESS EXCLUSIVE",
            "add a column of the new type, backfill it in batches, switch the code, and drop "
            "the old column in a later release",
        ),
        Rule(
            "set-not-null",
            "ACCESS EXCLUSIVE",
            "SET NOT NULL on {table}.{column} scans the whole table while holding ACCESS EXCLUSIVE",
            "ADD CONSTRAINT ... CHECK ({column} IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT in a "
            "later transaction, then SET NOT NULL (PostgreSQL 12+ skips the scan) and drop the "
            "check. lint sees such a check when a revision adds it (before --since too): one "
            "added by hand is invisible here, so allow the finding",
        ),
        Rule(
            "foreign-key-without-not-valid",
            "SHARE ROW EXCLUSIVE",
            "checks every row of {table} against {detail} while holding SHARE ROW EXCLUSIVE on "
            "both: writes to both wait",
            "add it NOT VALID (op.create_foreign_key(..., postgresql_not_valid=True)), then "
            "VALIDATE CONSTRAINT in a later transaction (SHARE UPDATE EXCLUSIVE: writes go on)",
        ),
        Rule(
            "check-without-not-valid",
            "ACCESS EXCLUSIVE",
            "checks every row of {table} while holding ACCESS EXCLUSIVE",
            "add it NOT VALID (op.create_check_constraint(..., postgresql_not_valid=True)), then "
            "VALIDATE CONSTRAINT in a later transaction (SHARE UPDATE EXCLUSIVE: writes go on)",
        ),
        Rule(
            "unique-without-index",
            "ACCESS EXCLUSIVE",
            "builds the {detail} index while holding ACCESS EXCLUSIVE on {table}: reads and "
            "writes wait for the whole build",
            "CREATE UNIQUE INDEX CONCURRENTLY first (inside an autocommit_block), then "
            "ADD CONSTRAINT ... {detail} USING INDEX",
        ),
        Rule(
            "exclusion-constraint",
            "ACCESS EXCLUSIVE",
            "builds the exclusion constraint's index while holding ACCESS EXCLUSIVE on {table}: "
            "reads and writes wait for the whole build",
            "PostgreSQL has no concurrent way to add one (no EXCLUDE ... USING INDEX): add it "
            "when the table is created, or allow it where the table is known to be small",
        ),
        Rule(
            "rename-column",
            "ACCESS EXCLUSIVE",
            "renames {table}.{column}: the image still running uses the old name and fails",
            "add the new column, write both, backfill, move the reads, and drop the old column "
            "in a later release",
        ),
        Rule(
            "rename-table",
            "ACCESS EXCLUSIVE",
            "renames {table}: the image still running uses the old name and fails",
            "rename it in a later release, once no running code uses the old name (a view with "
            "the old name can bridge the gap)",
        ),
        Rule(
            "drop-column",
            "ACCESS EXCLUSIVE",
            "drops {table}.{column}: the image still running selects it (SQLAlchemy names every "
            "mapped column) and fails",
            "release code that no longer uses the column first, and drop it in a later release",
        ),
        Rule(
            "drop-table",
            "ACCESS EXCLUSIVE",
            "drops {table}: the image still running may use it and fails",
            "release code that no longer uses the table first, and drop it in a later release",
        ),
        Rule(
            "vacuum-full",
            "ACCESS EXCLUSIVE",
            "VACUUM FULL rewrites {table} while holding ACCESS EXCLUSIVE (and cannot run in a "
            "transaction block)",
            "leave it to autovacuum or a plain VACUUM; reclaim space with pg_repack outside "
            "migrations",
        ),
        Rule(
            "table-rewrite",
            "ACCESS EXCLUSIVE",
            "{detail} rewrites all of {table} while holding ACCESS EXCLUSIVE: its reads and "
            "writes wait for the whole copy",
            "do it outside a deploy, in a maintenance window (pg_repack moves a table to "
            "another tablespace without the long lock)",
        ),
        Rule(
            "cluster",
            "ACCESS EXCLUSIVE",
            "CLUSTER rewrites {table} while holding ACCESS EXCLUSIVE",
            "leave it out of migrations; pg_repack --order-by does it without the long lock",
        ),
        Rule(
            "lock-table",
            "ACCESS EXCLUSIVE",
            "LOCK TABLE holds {detail} on {table} until the transaction ends: the application's "
            "writes (and with ACCESS EXCLUSIVE, its reads) queue behind it",
            "drop the explicit lock: each statement takes the lock it needs, for as short as it "
            "can",
        ),
        Rule(
            "backfill-under-lock",
            "ACCESS EXCLUSIVE",
            "{detail}: the application's reads and writes of {table} wait for the whole "
            "backfill, until the transaction commits",
            "commit the schema change first: backfill in a later revision (with "
            "transaction_per_migration=True each revision commits on its own) or inside "
            f"{_AUTOCOMMIT}, in batches of a few thousand rows",
        ),
        Rule(
            "offline-render-failed",
            None,
            "cannot be rendered offline (alembic upgrade --sql), so it cannot be checked: {detail}",
            "make upgrade() work without a database: no queries through op.get_bind(); branch on "
            "context.is_offline_mode() where it must read data",
        ),
        Rule(
            "syntax-error",
            None,
            "PostgreSQL's parser rejects this SQL: {detail}",
            "fix the SQL; the server would reject it the same way",
        ),
        Rule(
            "unknown-allow",
            None,
            "an allow comment lint cannot read, so it allows nothing: {detail}",
            f"write `{ALLOW_GRAMMAR}` with rule names from the table; a reason goes after "
            "':', '--' or ' - '",
        ),
    )
}
# Findings that are about the revision itself, not about a table: never exempt.
_NOT_TABLE_RULES = frozenset(
    {"concurrently-in-transaction", "offline-render-failed", "syntax-error", "unknown-allow"}
)

# Functions known not to be volatile (checked against pg_proc in the tests): as a column default
# they are evaluated once, and since PostgreSQL 11 ADD COLUMN does not rewrite the table. Any
# other function is treated as volatile: the rule errs on the side of telling.
NON_VOLATILE_FUNCTIONS = frozenset(
    {
        "now",
        "transaction_timestamp",
        "statement_timestamp",
        "timezone",
        "date_trunc",
        "make_date",
        "make_interval",
        "make_timestamp",
        "make_timestamptz",
        "to_timestamp",
        "to_date",
        "to_char",
        "lower",
        "upper",
        "btrim",
        "concat",
        "concat_ws",
        "md5",
        "jsonb_build_object",
        "jsonb_build_array",
        "json_build_object",
        "json_build_array",
        "to_jsonb",
        "to_json",
        "current_setting",
        "current_schema",
        "current_database",
    }
)
_SERIAL_TYPES = frozenset({"smallserial", "serial", "bigserial", "serial2", "serial4", "serial8"})
_CHECKED_STATEMENTS = frozenset(
    {
        "TransactionStmt",
        "CreateStmt",
        "CreateTableAsStmt",
        "IndexStmt",
        "AlterTableStmt",
        "RenameStmt",
        "DropStmt",
        "ReindexStmt",
        "VacuumStmt",
        "ClusterStmt",
        "LockStmt",
        "TruncateStmt",
        "CreateTrigStmt",
        "RefreshMatViewStmt",
        "AlterObjectSchemaStmt",
        *{"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "DoStmt"},
    }
)
# DML is parsed only while the transaction holds a lock that queues the application: a data
# migration's thousands of INSERTs cost nothing otherwise.
_DML = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
# Unqualified names resolve through the default search_path ("$user", public): public.
_DEFAULT_SCHEMA = "public"

# ALLOW_GRAMMAR, read from the revision file's real comments (Python's tokenize: a marker in a
# string or a docstring is not one). Rule names are separated by commas and/or blanks; the list
# ends at the first ':', '--', ' - ' or '#' (a linter's directive after it), and whatever
# follows is a reason, never read as a rule.
# Every name must be a rule of RULES; anything else (a typo, a reason without a separator,
# another word than `allow` after the marker) makes the comment allow nothing and is an
# `unknown-allow` finding, which no comment can allow.
_MARKER = re.compile(r"#\s*prosaas-migrate\s*:(.*)")
_ALLOW = re.compile(r"\s*allow(?:\s+|$)(.*)")
_REASON = re.compile(r":|--|\s-\s|#")


@dataclass(frozen=True)
class Finding:
    """One unsafe statement (or one revision that could not be checked)."""

    rule: str
    revision: str
    file: str
    statement: str
    lock: str | None
    message: str
    hint: str
    table: str | None = None
    line: int | None = None  # of the revision file: the operation that wrote the statement


@dataclass
class Report:
    """What `lint` found: findings in upgrade order, and what was checked and allowed."""

    findings: list[Finding] = field(default_factory=list)
    revisions_checked: int = 0
    allowed: int = 0
    renderer: str = offline.ENV_PY_RENDERER
    renderer_note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "revisions_checked": self.revisions_checked,
            "allowed": self.allowed,
            "renderer": self.renderer,
            "renderer_note": self.renderer_note,
            "findings": [asdict(finding) for finding in self.findings],
        }


@dataclass(frozen=True)
class AllowComments:
    """The rules a revision file allows, and its allow comments that lint cannot read."""

    rules: frozenset[str] = frozenset()
    problems: tuple[tuple[str, str], ...] = ()  # (the comment, what is wrong with it)


def lint_project(project: Project, variable: str, *, since: str | None = None) -> Report:
    """Render the project's revisions offline (all, or those after `since`) and check them."""
    cfg, script = offline.load_script_directory(project, variable)
    revisions, heads = offline.select(script, since)
    rendering = offline.render(cfg, script, revisions, starting_heads=heads)
    before: offline.Rendering | None = None
    if since is not None:
        # What the revisions before `since` did to the schema (column types, indexes, checks)
        # is known only by replaying them: rendered too, read, never reported.
        every, _ = offline.select(script, None)
        checked = {revision.revision for revision in revisions}
        earlier = [revision for revision in every if revision.revision not in checked]
        if earlier:
            before = offline.render(cfg, script, earlier)
    return check(rendering, revisions_checked=len(revisions), history=before)


def findings_for(
    script: ScriptDirectory, revisions: Sequence[str], *, current: Sequence[str] = ()
) -> Report:
    """Check `revisions` (ids in upgrade order from the `current` heads) with our own context.

    For status: the project's env.py is not run, so no project code beyond the revision files.
    """
    selected = [script.get_revision(revision) for revision in revisions]
    scripts = [s for s in selected if s is not None]
    rendering = offline.render(None, script, scripts, starting_heads=current)
    return check(rendering, revisions_checked=len(scripts))


def check(
    rendering: offline.Rendering,
    revisions_checked: int,
    *,
    history: offline.Rendering | None = None,
) -> Report:
    """Apply every rule to the rendered chunks, in output order; drop what a revision allows.

    `history`: the revisions before the checked ones, replayed first so that the schema they
    built is known (their findings are not reported).
    """
    report = Report(
        revisions_checked=revisions_checked,
        renderer=rendering.renderer,
        renderer_note=rendering.fallback_reason or rendering.warning,
    )
    checker = _Checker()
    for chunk in history.chunks if history is not None else ():
        checker.chunk(chunk)
    checker.new_session()  # the upgrade to check starts on a connection of its own
    comments: dict[str, AllowComments] = {}
    for chunk in rendering.chunks:
        found = checker.chunk(chunk)
        if chunk.revision is None:
            continue
        path = chunk.revision.path
        if path not in comments:  # once per file, even when multidb renders it per database
            comments[path] = read_allow_comments(path)
            report.findings.extend(
                _finding("unknown-allow", chunk.revision, checker.file, text, detail=problem)
                for text, problem in comments[path].problems
            )
        allowed = comments[path].rules
        report.findings.extend(finding for finding in found if finding.rule not in allowed)
        report.allowed += sum(finding.rule in allowed for finding in found)
    return report


def read_allow_comments(path: str) -> AllowComments:
    """The rules a revision file allows in its comments (ALLOW_GRAMMAR), and what is unreadable."""
    try:
        with open(path, "rb") as source:
            data = source.read()
    except OSError:
        return AllowComments()
    if b"prosaas-migrate" not in data:  # tokenizing every file would cost more than rendering
        return AllowComments()
    import tokenize

    rules: set[str] = set()
    problems: list[tuple[str, str]] = []
    try:
        for token in tokenize.tokenize(io.BytesIO(data).readline):
            marker = _MARKER.search(token.string) if token.type == tokenize.COMMENT else None
            if marker is not None:
                where = f"line {token.start[0]}"
                named, wrong = _parse_allow(marker.group(1))
                rules |= named
                problems.extend((token.string, f"{where}: {problem}") for problem in wrong)
    except (tokenize.TokenError, SyntaxError, ValueError):  # a sourceless .pyc, say
        pass  # nothing read, nothing allowed
    return AllowComments(frozenset(rules), tuple(problems))


def _parse_allow(directive: str) -> tuple[set[str], list[str]]:
    """The rules named after `prosaas-migrate:`, and what is wrong with the rest (if anything)."""
    allow = _ALLOW.fullmatch(directive)
    if allow is None:
        return set(), [f"{directive.strip()!r} does not start with 'allow'"]
    names = [name for name in re.split(r"[\s,]+", _REASON.split(allow.group(1), 1)[0]) if name]
    if not names:
        return set(), ["it names no rule"]
    if "unknown-allow" in names:
        return set(), ["unknown-allow cannot be allowed"]
    unknown = [name for name in names if name not in RULES]
    if not unknown:
        return set(names), []
    listed = ", ".join(repr(name) for name in unknown)
    problem = f"{listed} {'is not a rule' if len(unknown) == 1 else 'are not rules'}"
    from difflib import get_close_matches

    guesses = {name: get_close_matches(name, RULES, n=1) for name in unknown}
    meant = [(name, close[0]) for name, close in guesses.items() if close]
    if len(unknown) == 1 and meant:
        problem += f" (did you mean {meant[0][1]}?)"
    elif meant:
        problem += f" (did you mean {', '.join(f'{rule} for {name!r}' for name, rule in meant)}?)"
    return set(), [problem]  # a comment lint cannot read allows nothing


def exit_code(report: Report) -> int:
    """1 when anything was found (allowed findings do not count), else 0."""
    return 1 if report.findings else 0


@dataclass(frozen=True)
class Statement:
    """One statement of the rendered SQL as the server would run it (for `plan`)."""

    revision: Script | None  # None: Alembic's own, around the revisions
    node: Any  # pglast's RawStmt.stmt; None when PostgreSQL's parser rejects the text
    text: str  # as findings show it: comments removed, whitespace collapsed, shortened
    in_transaction: bool  # False: outside a transaction (an autocommit_block, say)


def statements(rendering: offline.Rendering) -> Iterator[Statement]:
    """Every statement of every chunk in output order, with whether a transaction is open.

    Transactions are read from the BEGIN/COMMIT Alembic writes, exactly as the rules read them
    (an autocommit_block renders a COMMIT before its statements and a BEGIN after them).
    """
    tracker = _Checker()
    for chunk in rendering.chunks:
        if chunk.session_start:
            tracker.in_transaction = False
        try:
            pieces = list(split(chunk.sql, only_slices=True))
        except ParseError:  # lint reports it as syntax-error; go on with what does parse
            pieces = list(split(chunk.sql, with_parser=False, only_slices=True))
        for piece in pieces:
            text = chunk.sql[piece]
            try:
                nodes = [raw.stmt for raw in pglast.parse_sql(text)]
            except ParseError:
                nodes = [None]
            for node in nodes:
                if isinstance(node, ast.TransactionStmt):
                    tracker._transaction(_Statement(node, text))
                yield Statement(
                    chunk.revision,
                    node,
                    _shorten(_without_comments(text)),
                    tracker.in_transaction,
                )


def _finding(
    rule_name: str,
    revision: Script,
    file: str,
    text: str,
    *,
    table: str | None = None,
    column: str | None = None,
    detail: str | None = None,
    lock: str | None = None,
    line: int | None = None,
    hint: str | None = None,
) -> Finding:
    rule = RULES[rule_name]
    return Finding(
        rule=rule_name,
        revision=revision.revision,
        file=file,
        statement=_shorten(text),
        lock=lock or rule.lock,
        message=rule.why.format(table=table, column=column, detail=detail),
        hint=hint or rule.hint.format(table=table, column=column, detail=detail),
        table=table,
        line=line,
    )


# -- the rules over parse trees ----------------------------------------------------------------

_Table = tuple[str, str]  # (schema, name), an unqualified name in the default schema


@dataclass
class _Statement:
    node: Any
    text: str
    line: int | None = None  # of the revision file, when the renderer saw which line wrote it


@dataclass
class _NotNullCheck:
    """A CHECK constraint that proves columns NOT NULL, as PostgreSQL 12+ uses it."""

    proves: set[str]  # the columns whose SET NOT NULL it makes a catalog-only change
    mentions: set[str]  # every column it reads: dropping any of them drops the constraint
    validated: bool


class _Checker:
    """Walks the chunks in output order, tracking transactions and constraints across revisions."""

    def __init__(self) -> None:
        self.in_transaction = False
        self.created: set[_Table] = set()  # in the current revision
        self.created_indexes: set[_Table] = set()  # (schema, index) in the current revision
        self.checks: dict[_Table, dict[str, _NotNullCheck]] = {}  # across the revisions read
        self.schema = history.Schema()  # column types and indexes, across the revisions read
        # Locks that queue the application, held by the open transaction (on tables that
        # existed before the revision): table -> (mode, what took it, in which revision).
        self.held: dict[_Table, tuple[str, str, str]] = {}
        self.revision: Script | None = None
        self.file = ""  # the revision's file as the report shows it
        self.found: list[Finding] = []
        self.line: int | None = None  # the revision file's line of the statement being checked
        self.within = ""  # "in a DO block " while checking a DO block's own statements
        self._handlers: dict[type, Callable[[_Statement], None]] = {
            ast.TransactionStmt: self._transaction,
            ast.CreateStmt: self._create_table,
            ast.CreateTableAsStmt: self._create_table_as,
            ast.SelectStmt: self._select,
            ast.IndexStmt: self._index,
            ast.AlterTableStmt: self._alter_table,
            ast.RenameStmt: self._rename,
            ast.DropStmt: self._drop,
            ast.ReindexStmt: self._reindex,
            ast.VacuumStmt: self._vacuum,
            ast.ClusterStmt: self._cluster,
            ast.LockStmt: self._lock,
            ast.AlterObjectSchemaStmt: self._set_schema,
            ast.InsertStmt: self._dml,
            ast.UpdateStmt: self._dml,
            ast.DeleteStmt: self._dml,
            ast.MergeStmt: self._dml,
            ast.DoStmt: self._do,
        }

    def chunk(self, chunk: offline.Chunk) -> list[Finding]:
        if chunk.resumed:
            # Rendering started over after a revision that failed offline; the real upgrade
            # goes on in its transaction: the locks stay held (a COMMIT already rendered, as
            # with transaction_per_migration, has let them go).
            self.in_transaction = False
        elif chunk.session_start:
            self.new_session()
        self.revision = chunk.revision
        self.file = offline.display_path(chunk.revision.path) if chunk.revision else ""
        self.created = set()
        self.created_indexes = set()
        self.found = []
        self.line = None
        if chunk.error is not None:
            self._report(
                "offline-render-failed",
                "",
                detail=chunk.error,
                line=chunk.error_line,
                hint=chunk.error_hint,
            )
        for statement in self._statements(chunk):
            self.line = statement.line
            if self.revision is None and not isinstance(statement.node, ast.TransactionStmt):
                continue  # Alembic's own statements around the revisions
            self._check(statement)
        return self.found

    def _check(self, statement: _Statement) -> None:
        handler = self._handlers.get(type(statement.node))
        if handler is not None:
            handler(statement)
        self._hold(statement)
        self.schema.apply(statement.node)

    def new_session(self) -> None:
        """A fresh connection: no transaction open, no lock held."""
        self.in_transaction = False
        self.held = {}

    def _hold(self, statement: _Statement) -> None:
        """Note the locks that queue the app which the statement leaves the transaction holding."""
        taken = locks.statement_locks(statement.node)
        if not self.in_transaction:
            self.held = {}  # a transaction ended (or each statement is its own)
            return
        if taken.transaction_control:
            return  # SAVEPOINT, RELEASE: the transaction and its locks go on
        for lock in taken.locks:
            table = self._lock_table(lock)
            if table is None or table in self.created or not locks.queues_app(lock.mode):
                continue
            held = self.held.get(table)
            if held is None or locks.MODES.index(lock.mode) > locks.MODES.index(held[0]):
                assert self.revision is not None
                self.held[table] = (lock.mode, taken.kind, self.revision.revision)
        node = statement.node
        if isinstance(node, ast.RenameStmt) and node.renameType == ObjectType.OBJECT_TABLE:
            old = _table(node.relation)
            if old in self.held:
                self.held[(old[0], str(node.newname))] = self.held.pop(old)
        elif isinstance(node, ast.AlterObjectSchemaStmt) and node.relation is not None:
            old = _table(node.relation)
            if old in self.held:
                self.held[(str(node.newschema), old[1])] = self.held.pop(old)

    def _lock_table(self, lock: locks.TableLock) -> _Table | None:
        """The table a lock is on, as the model knows it (an index's table, if it knows)."""
        key = (lock.schema or _DEFAULT_SCHEMA, lock.table)
        if lock.relkind == locks.TABLE:
            return key
        if lock.relkind == locks.TABLE_OF_INDEX:
            return self.schema.table_of_index(key)
        return None

    def _statements(self, chunk: offline.Chunk) -> Iterator[_Statement]:
        sql = chunk.sql
        texts: list[_Checked]
        try:
            texts = list(_checked_statements(sql))
        except ParseError as exc:
            message, location = exc.args[0], exc.args[1] if len(exc.args) > 1 else 0
            if self.revision is not None:
                self._report("syntax-error", _around(sql, location), detail=message)
            # Check what does parse: each statement the scanner can split out, on its own.
            pieces = split(sql, with_parser=False, only_slices=True)
            texts = [(piece.start, None, sql[piece], None) for piece in pieces]
        for offset, kind, text, tables in texts:
            if kind in _DML and (
                not self.held or (tables is not None and not tables & self.held.keys())
            ):
                continue  # no backfill-under-lock possible: not worth a parse
            try:
                parsed = pglast.parse_sql(text)
            except ParseError:
                continue  # reported above
            for raw in parsed:
                yield _Statement(raw.stmt, text, chunk.line_of(offset, offset + len(text)))

    def _report(
        self,
        rule_name: str,
        text: str,
        *,
        table: str | None = None,
        column: str | None = None,
        detail: str | None = None,
        lock: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        assert self.revision is not None
        self.found.append(
            _finding(
                rule_name,
                self.revision,
                self.file,
                _without_comments(text),
                table=table,
                column=column,
                detail=detail,
                lock=lock,
                line=line if line is not None else self.line,
                hint=hint,
            )
        )

    def _is_new(self, relation: Any) -> bool:
        return relation is not None and _table(relation) in self.created

    def _on_table(self, rule: str, statement: _Statement, relation: Any, **kw: Any) -> None:
        """A finding about an existing table; none when the revision created it itself."""
        if not self._is_new(relation):
            self._report(rule, statement.text, table=_name(relation), **kw)

    # -- one handler per statement type --------------------------------------------------------

    def _transaction(self, statement: _Statement) -> None:
        kind = statement.node.kind
        if kind in (TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START):
            self.in_transaction = True
        elif kind in (
            TransactionStmtKind.TRANS_STMT_COMMIT,
            TransactionStmtKind.TRANS_STMT_ROLLBACK,
            TransactionStmtKind.TRANS_STMT_PREPARE,
        ):
            self.in_transaction = False

    def _create_table(self, statement: _Statement) -> None:
        node = statement.node
        if node.if_not_exists:
            return  # it may exist already, with rows: not new, and its checks are unknown
        table = _table(node.relation)
        self.created.add(table)
        self.checks.pop(table, None)
        for element in node.tableElts or ():
            if isinstance(element, ast.ColumnDef):
                for constraint in element.constraints or ():
                    self._remember_check(table, constraint, validated=True)
            else:  # a new table is empty: PostgreSQL marks even a NOT VALID check validated
                self._remember_check(table, element, validated=True)

    def _create_table_as(self, statement: _Statement) -> None:
        into = statement.node.into
        if not statement.node.if_not_exists:
            self.created.add(_table(into.rel))
        if not into.skipData:  # WITH NO DATA reads nothing
            self._dml(statement)  # a copy of a locked table holds the lock as long as it runs

    def _select(self, statement: _Statement) -> None:
        into = statement.node.intoClause
        if into is not None:  # SELECT ... INTO creates the table, as CREATE TABLE AS does
            self.created.add(_table(into.rel))
        if into is not None or locks.writing_ctes(statement.node):
            self._dml(statement)  # a copy, or a WITH that writes: as INSERT ... SELECT

    def _index(self, statement: _Statement) -> None:
        node = statement.node
        if node.idxname:
            self.created_indexes.add(((node.relation.schemaname or _DEFAULT_SCHEMA), node.idxname))
        if node.concurrent:
            self._concurrently(statement, "CREATE INDEX CONCURRENTLY")
        else:
            self._on_table("index-not-concurrent", statement, node.relation)

    def _concurrently(self, statement: _Statement, what: str) -> None:
        if self.in_transaction:
            self._report("concurrently-in-transaction", statement.text, detail=what)

    def _reindex(self, statement: _Statement) -> None:
        node = statement.node
        if locks.option_on(node.params, "concurrently"):
            self._concurrently(statement, "REINDEX CONCURRENTLY")
        elif node.kind == ReindexObjectType.REINDEX_OBJECT_TABLE:
            self._on_table(
                "reindex-not-concurrent",
                statement,
                node.relation,
                detail=f"every index of {_name(node.relation)}",
            )
        elif node.kind == ReindexObjectType.REINDEX_OBJECT_INDEX:
            self._on_index("reindex-not-concurrent", statement, node.relation)
        else:  # SCHEMA, DATABASE, SYSTEM: each table in turn
            where = f"in schema {node.name}" if node.name else "in the database"
            self._report(
                "reindex-not-concurrent",
                statement.text,
                table=f"every table {where}",
                detail=f"every index {where}",
            )

    def _on_index(self, rule: str, statement: _Statement, index: Any) -> None:
        """A finding about the table of an existing index; none when the revision created either.

        The SQL names the index only: its table is the one the history says, when it knows.
        """
        key = (index.schemaname or _DEFAULT_SCHEMA, index.relname)
        table = self.schema.table_of_index(key)
        if key in self.created_indexes or (table is not None and table in self.created):
            return
        shown = _name(index)
        if table is None:
            where = f"the table of {shown}"
        else:
            where = table[1] if table[0] == _DEFAULT_SCHEMA else ".".join(table)
        self._report(rule, statement.text, table=where, detail=shown)

    def _do(self, statement: _Statement) -> None:
        """A DO block's own statements, checked as if written outside it, in its transaction
        (the idempotent `IF NOT EXISTS (...) THEN ALTER TABLE ...` runs on the first deploy);
        what it runs through EXECUTE is text only the server sees."""
        for text in locks.plpgsql_statements(statement.node):
            try:
                parsed = pglast.parse_sql(text)
            except ParseError:
                continue
            for raw in parsed:
                if isinstance(raw.stmt, ast.TransactionStmt | ast.DoStmt):
                    continue  # not in a DO block that runs in a transaction
                self.within = "in a DO block "
                try:
                    self._check(_Statement(raw.stmt, statement.text, statement.line))
                finally:
                    self.within = ""

    def _dml(self, statement: _Statement) -> None:
        """backfill-under-lock: UPDATE, DELETE, MERGE or INSERT ... SELECT (or a SELECT whose
        WITH writes, a CREATE TABLE AS or SELECT INTO copy) on a table the open transaction
        holds a lock on that queues the app. INSERT ... VALUES writes the rows it lists (seed
        data), not a backfill: it is not reported."""
        taken = locks.statement_locks(statement.node)
        if taken.kind == "INSERT":
            return
        for lock in taken.locks:
            table = self._lock_table(lock)
            held = self.held.get(table) if table is not None else None
            if held is None or table in self.created:
                continue
            mode, by, revision = held
            current = self.revision.revision if self.revision is not None else None
            where = "this revision" if revision == current else f"revision {revision}"
            shown = lock.table if lock.schema is None else f"{lock.schema}.{lock.table}"
            self._report(
                "backfill-under-lock",
                statement.text,
                table=shown,
                detail=f"{taken.kind} {self.within}runs in the transaction that holds {mode} on "
                f"{shown} (taken by {by} in {where})",
                lock=mode,
            )

    def _alter_table(self, statement: _Statement) -> None:
        node = statement.node
        if node.objtype != ObjectType.OBJECT_TABLE:
            return
        for command in node.cmds or ():
            check = self._commands.get(command.subtype)
            if check is not None:
                check(self, statement, node.relation, command)

    def _add_column(self, statement: _Statement, relation: Any, command: Any) -> None:
        column = command.def_
        constraints = {c.contype: c for c in column.constraints or ()}
        on_table = partial(self._on_table, statement=statement, relation=relation)
        type_name = column.typeName.names[-1].sval if column.typeName else ""
        default = constraints.get(ConstrType.CONSTR_DEFAULT)
        # DEFAULT NULL (what server_default=sa.null() renders) fills nothing.
        fills = (default is not None and not _is_null(default.raw_expr)) or (
            type_name in _SERIAL_TYPES
        )
        if (
            not fills
            and {ConstrType.CONSTR_IDENTITY, ConstrType.CONSTR_GENERATED} & constraints.keys()
        ):
            fills = True
        if not fills and (
            ConstrType.CONSTR_NOTNULL in constraints or ConstrType.CONSTR_PRIMARY in constraints
        ):
            on_table(rule="required-column-without-default", column=column.colname)
        rewrite = _rewriting_fill(type_name, constraints)
        if rewrite:
            on_table(rule="volatile-default", column=column.colname, detail=rewrite)
        for constraint in column.constraints or ():
            self._constraint(statement, relation, constraint)

    def _add_constraint(self, statement: _Statement, relation: Any, command: Any) -> None:
        self._constraint(statement, relation, command.def_)

    def _constraint(self, statement: _Statement, relation: Any, constraint: Any) -> None:
        kind = constraint.contype
        on_table = partial(self._on_table, statement=statement, relation=relation)
        if kind == ConstrType.CONSTR_FOREIGN and not constraint.skip_validation:
            on_table(rule="foreign-key-without-not-valid", detail=_name(constraint.pktable))
        elif kind == ConstrType.CONSTR_CHECK and not constraint.skip_validation:
            on_table(rule="check-without-not-valid")
        elif kind in (ConstrType.CONSTR_UNIQUE, ConstrType.CONSTR_PRIMARY) and not (
            constraint.indexname
        ):
            detail = "UNIQUE" if kind == ConstrType.CONSTR_UNIQUE else "PRIMARY KEY"
            on_table(rule="unique-without-index", detail=detail)
        elif kind == ConstrType.CONSTR_EXCLUSION:
            on_table(rule="exclusion-constraint")
        self._remember_check(_table(relation), constraint, validated=not constraint.skip_validation)

    def _alter_type(self, statement: _Statement, relation: Any, command: Any) -> None:
        column = command.def_
        new = history.column_type(column.typeName)
        old = self.schema.type_of(_table(relation), command.name)
        if column.collClause is not None:
            detail = f"to {new or 'a new type'} with a new collation (its indexes are rebuilt)"
        elif old is not None and old.collation is not None:
            detail = (
                f'from {old} COLLATE "{old.collation}" to {new or "a new type"}, which resets '
                "its collation to the default (its indexes are rebuilt)"
            )
        elif old is None:
            detail = (
                f"to {new or 'a new type'}, from a type lint does not know (no revision it "
                "read gives it), so it may not be binary-compatible"
            )
        elif new is None:
            detail = f"from {old} to a type lint cannot judge"
        elif not _plain_using(column.raw_default, command.name, new):
            detail = f"from {old} to {new} with a USING expression"
        elif not history.rewrites(old, new):
            return  # binary-compatible: a catalog change, checked against the server
        else:
            detail = f"from {old} to {new}"
        self._on_table(
            "column-type-change", statement, relation, column=command.name, detail=detail
        )

    def _set_not_null(self, statement: _Statement, relation: Any, command: Any) -> None:
        checks = self.checks.get(_table(relation), {}).values()
        if not any(check.validated and command.name in check.proves for check in checks):
            self._on_table("set-not-null", statement, relation, column=command.name)

    def _drop_column(self, statement: _Statement, relation: Any, command: Any) -> None:
        self._on_table("drop-column", statement, relation, column=command.name)
        checks = self.checks.get(_table(relation), {})
        for name in [name for name, check in checks.items() if command.name in check.mentions]:
            del checks[name]

    def _validate_constraint(self, _statement: _Statement, relation: Any, command: Any) -> None:
        check = self.checks.get(_table(relation), {}).get(command.name)
        if check is not None:
            check.validated = True

    def _rewrite(self, statement: _Statement, relation: Any, command: Any) -> None:
        what = {
            AlterTableType.AT_SetTableSpace: f"SET TABLESPACE {command.name}",
            AlterTableType.AT_SetLogged: "SET LOGGED",
            AlterTableType.AT_SetUnLogged: "SET UNLOGGED",
        }[command.subtype]
        self._on_table("table-rewrite", statement, relation, detail=what)

    def _drop_constraint(self, _statement: _Statement, relation: Any, command: Any) -> None:
        self.checks.get(_table(relation), {}).pop(command.name, None)

    _commands: ClassVar[dict[AlterTableType, Callable[[_Checker, _Statement, Any, Any], None]]] = {
        AlterTableType.AT_AddColumn: _add_column,
        AlterTableType.AT_AddConstraint: _add_constraint,
        AlterTableType.AT_AlterColumnType: _alter_type,
        AlterTableType.AT_SetNotNull: _set_not_null,
        AlterTableType.AT_DropColumn: _drop_column,
        AlterTableType.AT_ValidateConstraint: _validate_constraint,
        AlterTableType.AT_DropConstraint: _drop_constraint,
        AlterTableType.AT_SetTableSpace: _rewrite,
        AlterTableType.AT_SetLogged: _rewrite,
        AlterTableType.AT_SetUnLogged: _rewrite,
    }

    def _remember_check(self, table: _Table, constraint: Any, *, validated: bool) -> None:
        """Note a CHECK constraint that proves some column NOT NULL (for set-not-null)."""
        if (
            not isinstance(constraint, ast.Constraint)
            or constraint.contype != ConstrType.CONSTR_CHECK
        ):
            return
        proves = _proven_not_null(constraint.raw_expr)
        if not proves:
            return
        mentions = _columns(constraint.raw_expr)
        # PostgreSQL's own name for an unnamed check: <table>_<column>_check when it reads
        # exactly one column, else <table>_check (short names; no clash numbering).
        only = next(iter(mentions)) if len(mentions) == 1 else None
        name = constraint.conname or "_".join(filter(None, (table[1], only, "check")))
        self.checks.setdefault(table, {})[name] = _NotNullCheck(proves, mentions, validated)

    def _rename(self, statement: _Statement) -> None:
        node = statement.node
        if node.renameType == ObjectType.OBJECT_TABLE:
            self._move_table(statement, node.relation, (_table(node.relation)[0], node.newname))
        elif (
            node.renameType == ObjectType.OBJECT_COLUMN
            and node.relationType == ObjectType.OBJECT_TABLE
        ):
            self._on_table("rename-column", statement, node.relation, column=node.subname)
            for check in self.checks.get(_table(node.relation), {}).values():
                for names in (check.proves, check.mentions):
                    if node.subname in names:
                        names.discard(node.subname)
                        names.add(node.newname)
        elif node.renameType == ObjectType.OBJECT_TABCONSTRAINT:
            checks = self.checks.get(_table(node.relation), {})
            if node.subname in checks:
                checks[node.newname] = checks.pop(node.subname)

    def _set_schema(self, statement: _Statement) -> None:
        """ALTER TABLE ... SET SCHEMA: to the running image's queries, a rename."""
        node = statement.node
        if node.objectType != ObjectType.OBJECT_TABLE or node.relation is None:
            return
        self._move_table(statement, node.relation, (str(node.newschema), node.relation.relname))

    def _move_table(self, statement: _Statement, relation: Any, new: _Table) -> None:
        """A table renamed or moved to another schema: its checks follow it; for the running
        image's queries it is a rename (unless this revision created it)."""
        old = _table(relation)
        if old in self.checks:
            self.checks[new] = self.checks.pop(old)
        if self._is_new(relation):
            self.created.add(new)
        else:
            self._report("rename-table", statement.text, table=_name(relation))

    def _drop(self, statement: _Statement) -> None:
        node = statement.node
        if node.concurrent:
            self._concurrently(statement, "DROP INDEX CONCURRENTLY")
        elif node.removeType == ObjectType.OBJECT_INDEX:
            for names in node.objects or ():
                parts = [part.sval for part in names]
                index = ast.RangeVar(
                    schemaname=parts[-2] if len(parts) > 1 else None, relname=parts[-1]
                )
                self._on_index("drop-index-not-concurrent", statement, index)
        if node.removeType != ObjectType.OBJECT_TABLE:
            return
        for names in node.objects or ():
            parts = [part.sval for part in names]
            relation = ast.RangeVar(
                schemaname=parts[-2] if len(parts) > 1 else None, relname=parts[-1]
            )
            self._on_table("drop-table", statement, relation)
            self.checks.pop(_table(relation), None)

    def _vacuum(self, statement: _Statement) -> None:
        node = statement.node
        if not node.is_vacuumcmd or not locks.option_on(node.options, "full"):
            return
        relations = [rel.relation for rel in node.rels or ()] or [None]
        for relation in relations:
            self._on_table("vacuum-full", statement, relation)

    def _cluster(self, statement: _Statement) -> None:
        self._on_table("cluster", statement, statement.node.relation)

    def _lock(self, statement: _Statement) -> None:
        for lock in locks.statement_locks(statement.node).locks:
            # Up to SHARE UPDATE EXCLUSIVE, the application's reads and writes go on.
            relation = ast.RangeVar(schemaname=lock.schema, relname=lock.table)
            if locks.queues_app(lock.mode) and not self._is_new(relation):
                self._report(
                    "lock-table",
                    statement.text,
                    table=_name(relation),
                    detail=lock.mode,
                    lock=lock.mode,
                )


_Checked = tuple[int, "str | None", str, "frozenset[_Table] | None"]


def _checked_statements(sql: str) -> Iterator[_Checked]:
    """The offset, node type and text of each statement of a type some rule looks at, in
    order, and for DML every table it names (None: not known), so that a DML statement on
    tables no lock is held on needs no tree.

    The parser's JSON output finds them: building pglast's Python tree for every statement
    (each INSERT, UPDATE, version-table write) would cost about as much as rendering them.
    """
    try:
        statements = json.loads(parse_sql_json(sql)).get("stmts", ())
    except RecursionError:  # a deeply nested expression (DEFAULT 1+1+...): too deep for json
        yield from _checked_statements_deep(sql)
        return
    encoded = sql.encode()  # the parser's offsets count bytes
    for raw in statements:
        kind, node = next(iter(raw["stmt"].items()))
        if kind in _CHECKED_STATEMENTS or (
            kind == "SelectStmt" and ("intoClause" in node or _json_writes(node))
        ):
            start = raw.get("stmt_location", 0)
            stop = start + raw["stmt_len"] if raw.get("stmt_len") else len(encoded)
            tables = _json_tables(node) if kind in _DML else None
            yield len(encoded[:start].decode()), kind, encoded[start:stop].decode(), tables


def _json_writes(node: Any) -> bool:
    """Whether a SELECT's JSON tree has a data-modifying WITH (WITH d AS (DELETE ...) SELECT)."""
    if "withClause" not in node:
        return False
    stack = [node["withClause"]]
    while stack:
        each = stack.pop()
        if isinstance(each, dict):
            if _DML & each.keys():
                return True
            stack.extend(each.values())
        elif isinstance(each, list):
            stack.extend(each)
    return False


def _json_tables(tree: Any) -> frozenset[_Table]:
    """Every name of the parser's JSON tree that a RangeVar (the only node with relname) gives."""
    found = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "relname" in node:
                found.add((node.get("schemaname") or _DEFAULT_SCHEMA, node["relname"]))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return frozenset(found)


def _checked_statements_deep(sql: str) -> Iterator[_Checked]:
    """_checked_statements through pglast's tree, which it builds without Python recursion."""
    for raw in pglast.parse_sql(sql):
        kind = type(raw.stmt).__name__
        if (
            kind in _CHECKED_STATEMENTS
            or getattr(raw.stmt, "intoClause", None) is not None
            or (kind == "SelectStmt" and locks.writing_ctes(raw.stmt))
        ):
            start = raw.stmt_location or 0  # pglast's tree counts characters
            text = sql[start : start + raw.stmt_len if raw.stmt_len else len(sql)]
            yield start, kind, text, None


def _plain_using(expression: Any, column: str, new: history.ColumnType) -> bool:
    """No USING, or one that only names the column (`USING c`, or `USING c::<the new type>`)."""
    if isinstance(expression, ast.TypeCast):
        if history.column_type(expression.typeName) != new:
            return False
        expression = expression.arg
    return expression is None or (
        isinstance(expression, ast.ColumnRef) and _column(expression) == column
    )


def _rewriting_fill(type_name: str, constraints: dict[Any, Any]) -> str | None:
    """Why ADD COLUMN must write a value into every existing row, or None when it need not."""
    if type_name in _SERIAL_TYPES:
        return f"a {type_name} column fills every row from a sequence (nextval() is volatile)"
    if ConstrType.CONSTR_IDENTITY in constraints:
        return "an identity column fills every row from a sequence"
    generated = constraints.get(ConstrType.CONSTR_GENERATED)
    if generated is not None and generated.generated_kind != "v":  # VIRTUAL (PostgreSQL 18)
        return "a stored generated column computes a value for every row"
    default = constraints.get(ConstrType.CONSTR_DEFAULT)
    if default is None:
        return None
    volatile = sorted(_functions(default.raw_expr) - NON_VOLATILE_FUNCTIONS)
    if not volatile:
        return None
    return f"the default calls {', '.join(f'{name}()' for name in volatile)}, volatile"


def _nodes(root: Any) -> Iterator[Any]:
    """Every node of an expression tree, without recursion (a DEFAULT 1+1+... nests deep)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, tuple | list):
            stack.extend(node)
        elif isinstance(node, ast.Node):
            yield node
            stack.extend(getattr(node, attribute) for attribute in node)


def _functions(expression: Any) -> set[str]:
    """The names of the functions an expression calls (its SQL value functions are stable)."""
    return {
        str(node.funcname[-1].sval).lower()
        for node in _nodes(expression)
        if isinstance(node, ast.FuncCall) and node.funcname
    }


def _columns(expression: Any) -> set[str]:
    """The columns an expression reads (a qualified t.a is a)."""
    found = (_column(node) for node in _nodes(expression))
    return {column for column in found if column is not None}


def _proven_not_null(expression: Any) -> set[str]:
    """The columns a CHECK proves NOT NULL the way PostgreSQL's planner proves it.

    Checked against the server in the tests: `c IS NOT NULL` and `NOT (c IS NULL)`, alone or
    ANDed with anything; not a strict comparison (`c > 0` lets NULL through a CHECK), not OR.
    """
    proven: set[str] = set()
    stack = [expression]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.AND_EXPR:
            stack.extend(node.args or ())
            continue
        column = _null_test(node, NullTestType.IS_NOT_NULL)
        if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.NOT_EXPR and node.args:
            column = _null_test(node.args[0], NullTestType.IS_NULL)
        if column is not None:
            proven.add(column)
    return proven


def _null_test(node: Any, kind: NullTestType) -> str | None:
    """The column of `column IS [NOT] NULL` (as `kind` says), else None."""
    if isinstance(node, ast.NullTest) and node.nulltesttype == kind:
        return _column(node.arg)
    return None


def _column(node: Any) -> str | None:
    """The column a ColumnRef names (a qualified t.a is a), else None."""
    if not isinstance(node, ast.ColumnRef) or not node.fields:
        return None
    last = node.fields[-1]
    return str(last.sval) if isinstance(last, ast.String) else None


def _is_null(expression: Any) -> bool:
    """NULL, or NULL cast to a type (DEFAULT NULL::integer)."""
    while isinstance(expression, ast.TypeCast):
        expression = expression.arg
    return isinstance(expression, ast.A_Const) and bool(expression.isnull)


def _table(relation: Any) -> _Table:
    return (relation.schemaname or _DEFAULT_SCHEMA, relation.relname)


def _name(relation: Any) -> str:
    if relation is None:
        return "every table"
    return f"{relation.schemaname}.{relation.relname}" if relation.schemaname else relation.relname


def _shorten(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= STATEMENT_WIDTH else flat[: STATEMENT_WIDTH - 3] + "..."


def _without_comments(text: str) -> str:
    """The SQL without its -- and /* */ comments (Alembic's `-- Running upgrade` among them)."""
    if "--" not in text and "/*" not in text:
        return text
    try:
        tokens = scan(text)
    except ParseError:  # an unterminated string: the scanner cannot tell comments apart
        return text
    kept, position = [], 0
    for token in tokens:
        if token.name in ("SQL_COMMENT", "C_COMMENT"):
            kept.append(text[position : token.start] + " ")
            position = token.end + 1
    kept.append(text[position:])
    return "".join(kept)


def _around(sql: str, location: int) -> str:
    """The statement around a parse error's position: from the previous ; to the next one."""
    start = sql.rfind(";", 0, location) + 1
    stop = sql.find(";", location)
    return sql[start : stop if stop != -1 else len(sql)]


# -- rendering --------------------------------------------------------------------------------


def render_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2)


def render_text(report: Report, *, style: Callable[..., str]) -> str:
    """Findings grouped by revision; `style` is click.style (or a no-op): colour is the caller's."""
    out: list[str] = []
    current: tuple[str, str] | None = None
    for finding in report.findings:
        if (finding.revision, finding.file) != current:
            current = (finding.revision, finding.file)
            if out:
                out.append("")
            out.append(style(f"{finding.revision}  {finding.file}", bold=True))
        out.append(f"  {style(finding.rule, fg='red')}: {finding.statement}".rstrip(": "))
        if finding.line is not None:
            out.append(f"    at:   {finding.file}:{finding.line}")
        if finding.lock:
            where = f" on {finding.table}" if finding.table else ""
            out.append(f"    lock: {finding.lock}{where}")
        out.append(f"    why:  {finding.message}")
        out.append(f"    fix:  {finding.hint}")
    if out:
        out.append("")
    out.append(summary(report, style=style))
    return "\n".join(out)


def summary(report: Report, *, style: Callable[..., str]) -> str:
    revisions = len({finding.revision for finding in report.findings})
    checked = f"{report.revisions_checked} revision{'s' * (report.revisions_checked != 1)}"
    if report.findings:
        count = len(report.findings)
        line = style(
            f"{count} finding{'s' * (count != 1)} in {revisions} of {checked} checked", fg="red"
        )
    else:
        line = style(f"no findings in {checked} checked", fg="green")
    if report.allowed:
        line += f"; {report.allowed} allowed by a comment in the revision"
    if report.renderer == offline.OWN_RENDERER and report.renderer_note:
        line += f"\n(rendered with prosaas-migrate's offline context: {report.renderer_note})"
    elif report.renderer_note:
        line += f"\n(note: {report.renderer_note})"
    return line


def render_github(report: Report) -> str:
    """GitHub Actions workflow commands: one `::error` annotation per finding, at its file and
    line (file only when the line is unknown), then the summary as a plain line."""
    out = []
    for finding in report.findings:
        where = f"file={_github_property(finding.file)}"
        if finding.line is not None:
            where += f",line={finding.line}"
        title = _github_property(f"prosaas-migrate lint: {finding.rule}")
        lock = f" (lock: {finding.lock}{f' on {finding.table}' if finding.table else ''})"
        text = f"{finding.message}{lock if finding.lock else ''}. Fix: {finding.hint}"
        if finding.statement:
            text += f"\n{finding.statement}"
        out.append(f"::error {where},title={title}::{_github_data(text)}")
    out.append(summary(report, style=lambda text, **_: text))
    return "\n".join(out)


def _github_data(text: str) -> str:
    """Escape a workflow command's message, as @actions/core's escapeData does."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _github_property(text: str) -> str:
    """Escape a workflow command's property value, as @actions/core's escapeProperty does."""
    return _github_data(text).replace(":", "%3A").replace(",", "%2C")
