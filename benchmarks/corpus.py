"""`prosaas-migrate lint` against squawk on real Alembic revisions from PyPI packages.

For each pinned wheel: install it into a scratch folder (without its dependencies, standing in
for the few modules its code imports, see corpus_stubs; or with them, where stand-ins cannot
do), copy its PostgreSQL revisions into a minimal Alembic project (the stock `alembic init`
env.py: the projects' own env.py files import their whole application and its settings),
render every revision offline once (prosaas_migrate.offline, in-process), give squawk each
revision's SQL as one file, run `prosaas-migrate lint --json` on the same project, and compare
their findings per (revision, statement, category). Not part of the test suite, CI or
./scripts/bench: the first run downloads and installs about 900 MB (2 minutes), later runs
take about 30 seconds.

Run: `.venv/bin/python -m benchmarks.corpus [PROJECT...]` (cache: $PROSAAS_CORPUS_CACHE, else
~/.cache/prosaas-migrate/corpus). squawk-cli is installed into the venv when missing.

Transactions: Alembic on PostgreSQL runs the whole upgrade in one transaction, and an
`autocommit_block()` ends it (COMMIT) and begins a new one (BEGIN) around its statements. So
squawk is not given --assume-in-transaction (it would call that COMMIT "transaction-nesting":
on this corpus it adds 32 transaction-nesting and 15 ban-uncommitted-transaction findings, all
at autocommit blocks, and changes nothing else): each file gets an explicit BEGIN when a
transaction is open where the revision starts, and a COMMIT when one is still open where it
ends, which is exactly what runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pglast
from pglast import ast
from pglast.parser import ParseError, split

from benchmarks import corpus_stubs
from prosaas_migrate import lint

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SQUAWK_VERSION = "2.70.0"
PG_VERSION = "15"  # what lint assumes: ADD COLUMN with a constant default never rewrites


@dataclass(frozen=True)
class Corpus:
    """A pinned wheel and where its PostgreSQL revisions live inside it."""

    package: str
    version: str
    versions: str  # folder of revision files, inside the installed wheel
    note: str = ""
    # Install its dependencies too (pinned by its own metadata, resolved by pip) instead of
    # standing in for them: for code that the stubs cannot satisfy.
    with_dependencies: bool = False


CORPORA = (
    Corpus(
        "prefect",
        "3.9.1",
        "prefect/server/database/_migrations/versions/postgresql",
        "the postgresql history only (prefect keeps a separate sqlite one)",
        with_dependencies=True,  # its column types import prefect.settings: pydantic models
    ),
    Corpus(
        "mlflow",
        "3.17.2",  # 3.18.0 pins an mlflow-tracing that is not on PyPI
        "mlflow/store/db_migrations/versions",
        "the tracking store",
        with_dependencies=True,  # revisions name tables by its models: mlflow.entities, protobuf
    ),
    Corpus("jupyterhub", "6.1.1", "jupyterhub/alembic/versions"),
    # Not indico 3.2.9: its modules need SQLAlchemy 1.4 (select([...])) at import time, and
    # prosaas-migrate renders with SQLAlchemy 2.
    Corpus("optuna", "5.1.0", "optuna/storages/_rdb/alembic/versions", with_dependencies=True),
    Corpus("ckan", "2.11.3", "ckan/migration/versions", "PostgreSQL only"),
)

# -- the mapping: every lint rule and every squawk rule (squawk's rule list, 2.70) to a category.
# Findings agree when they are on the same statement of the same revision and share a category.
LINT_CATEGORIES: dict[str, str] = {
    "index-not-concurrent": "index-build-blocks-writes",
    "concurrently-in-transaction": "concurrently-in-transaction",
    "required-column-without-default": "required-column",
    "volatile-default": "rewriting-add-column",
    "column-type-change": "column-type-change",
    "set-not-null": "set-not-null-scan",
    "foreign-key-without-not-valid": "foreign-key-validation",
    "check-without-not-valid": "check-validation",
    "unique-without-index": "constraint-index-build",
    "exclusion-constraint": "constraint-index-build",
    "rename-column": "rename-column",
    "rename-table": "rename-table",
    "drop-column": "drop-column",
    "drop-table": "drop-table",
    "vacuum-full": "table-rewrite-command",
    "cluster": "table-rewrite-command",
    "table-rewrite": "table-rewrite-command",
    "lock-table": "explicit-lock",
    "drop-index-not-concurrent": "drop-index-not-concurrent",
    "reindex-not-concurrent": "reindex-not-concurrent",
    "backfill-under-lock": "backfill-under-lock",
    "offline-render-failed": "unchecked-revision",
    "syntax-error": "syntax-error",
    "unknown-allow": "lint-comment",
}
# A squawk rule may stand for more than one lint category (constraint-missing-not-valid is
# both the foreign key and the check case).
SQUAWK_CATEGORIES: dict[str, tuple[str, ...]] = {
    "require-concurrent-index-creation": ("index-build-blocks-writes",),
    "ban-concurrent-index-creation-in-transaction": ("concurrently-in-transaction",),
    "adding-required-field": ("required-column",),
    "adding-field-with-default": ("rewriting-add-column",),
    "changing-column-type": ("column-type-change",),
    "adding-not-nullable-field": ("set-not-null-scan",),
    "adding-foreign-key-constraint": ("foreign-key-validation",),
    # squawk also says it of UNIQUE and PRIMARY KEY, which have no NOT VALID: the hazard there
    # is the index build
    "constraint-missing-not-valid": (
        "foreign-key-validation",
        "check-validation",
        "constraint-index-build",
    ),
    "disallowed-unique-constraint": ("constraint-index-build",),
    "adding-serial-primary-key-field": ("constraint-index-build",),
    "renaming-column": ("rename-column",),
    "renaming-table": ("rename-table",),
    "ban-drop-column": ("drop-column",),
    "ban-drop-table": ("drop-table",),
    "prefer-repack": ("table-rewrite-command",),
    "syntax-error": ("syntax-error",),
    # hazards lint has no rule for (yet)
    "require-concurrent-index-deletion": ("drop-index-not-concurrent",),
    "require-concurrent-reindex": ("reindex-not-concurrent",),
    "require-concurrent-partition-detach": ("detach-partition",),
    "ban-drop-database": ("drop-database",),
    "ban-drop-not-null": ("drop-not-null",),
    "ban-truncate-cascade": ("truncate-cascade",),
    "ban-create-domain-with-constraint": ("domain-constraint",),
    "ban-alter-domain-with-add-constraint": ("domain-constraint",),
    "identifier-too-long": ("identifier-too-long",),
    "ban-duplicate-column-assignments": ("duplicate-assignment",),
    "require-enum-value-ordering": ("enum-value-order",),
    "transaction-nesting": ("transaction-structure",),
    "ban-uncommitted-transaction": ("transaction-structure",),
    # settings prosaas-migrate's runner makes on every migration connection
    "require-lock-timeout": ("timeout-settings",),
    "require-statement-timeout": ("timeout-settings",),
    "require-timeout-settings": ("timeout-settings",),
    # type and style advice: no lock, no break of the running image
    "prefer-bigint-over-int": ("type-advice",),
    "prefer-bigint-over-smallint": ("type-advice",),
    "prefer-identity": ("type-advice",),
    "prefer-text-field": ("type-advice",),
    "prefer-timestamp-tz": ("type-advice",),
    "prefer-timestamptz": ("type-advice",),
    "ban-char-field": ("type-advice",),
    "prefer-robust-stmts": ("rerun-advice",),
    "require-table-schema": ("type-advice",),
    # new in squawk 2.64-2.70 (after the rule list above was read)
    "ban-drop-constraint": ("drop-constraint",),
    "ban-drop-default": ("drop-default",),
    "renaming-object": ("rename-other",),
    "ban-drop-sequence": ("drop-sequence",),
}
# Categories outside lint's purpose by design: counted, not judged one by one.
OUT_OF_SCOPE = {
    "timeout-settings": "FP under prosaas-migrate: `run` sets lock_timeout "
    "(MIGRATION_DDL_LOCK_TIMEOUT) and statement_timeout on every migration connection",
    "type-advice": "scope: type advice for new columns, no lock and no break of the running image",
    "rerun-advice": "scope: IF [NOT] EXISTS advice; Alembic's version table already makes a "
    "revision run once, in one transaction",
}
OUT_OF_SCOPE_RULES = frozenset(
    rule for rule, categories in SQUAWK_CATEGORIES.items() if categories[0] in OUT_OF_SCOPE
)
# Categories where the finding is about the table's lock or rows, so a table created earlier in
# the same revision (empty, unseen by the running image) makes it a false positive.
TABLE_HAZARDS = frozenset(
    {
        "index-build-blocks-writes",
        "required-column",
        "rewriting-add-column",
        "column-type-change",
        "set-not-null-scan",
        "foreign-key-validation",
        "check-validation",
        "constraint-index-build",
        "rename-column",
        "drop-column",
        "drop-not-null",
    }
)


@dataclass
class Finding:
    tool: str  # "lint" or "squawk"
    rule: str
    categories: tuple[str, ...]
    revision: str
    statement: int | None  # index in the revision's statements; None: about the whole revision
    text: str
    message: str = ""


@dataclass
class Revision:
    id: str
    path: str
    statements: list[str]  # each statement's SQL, in order, as rendered
    error: str | None = None


@dataclass
class Outcome:
    corpus: Corpus
    revisions: list[Revision]
    lint: list[Finding]
    squawk: list[Finding]
    seconds: dict[str, float]
    stubbed: list[str]
    renderer: str
    agreed: list[tuple[Finding, Finding]] = field(default_factory=list)
    lint_only: list[Finding] = field(default_factory=list)
    squawk_only: list[Finding] = field(default_factory=list)
    squawk_repeats: int = 0  # squawk findings on a statement and category already agreed


# -- fetching and building -------------------------------------------------------------------


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "prosaas-migrate" / "corpus"
    return Path(os.environ.get("PROSAAS_CORPUS_CACHE", default))


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def installed(corpus: Corpus, cache: Path) -> Path:
    """The wheel, downloaded once and installed into its own folder (with its dependencies only
    where the corpus says so)."""
    wheels = cache / "wheels"
    pattern = f"{corpus.package.replace('-', '_')}-{corpus.version}-*.whl"
    if not list(wheels.glob(pattern)):
        pip("download", "--no-deps", f"{corpus.package}=={corpus.version}", "-d", str(wheels))
    site = cache / "site" / f"{corpus.package}-{corpus.version}"
    if not (site / corpus.versions).is_dir():
        shutil.rmtree(site, ignore_errors=True)
        wheel = next(wheels.glob(pattern))
        deps = [] if corpus.with_dependencies else ["--no-deps"]
        pip("install", *deps, "--no-compile", "--target", str(site), str(wheel))
    return site


def build_project(corpus: Corpus, site: Path, cache: Path) -> Path:
    """A fresh stock `alembic init` project holding a copy of the wheel's revision files."""
    from alembic import command
    from alembic.config import Config

    root = cache / "projects" / f"{corpus.package}-{corpus.version}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # init prints
        command.init(Config(str(root / "alembic.ini")), str(root / "migrations"), "generic")
    ini = root / "alembic.ini"
    ini.write_text(
        ini.read_text().replace(
            "driver://user:pass@localhost/dbname", "postgresql://corpus@127.0.0.1:1/corpus"
        )
    )
    versions = root / "migrations" / "versions"
    for source in sorted((site / corpus.versions).glob("*.py")):
        if source.name != "__init__.py":
            shutil.copy(source, versions / source.name)
    return root


# -- rendering once, for squawk --------------------------------------------------------------


def stub_folders(corpus: Corpus, site: Path, root: Path) -> list[str]:
    """Where code may get a stand-in for a missing module (none with real dependencies)."""
    return [] if corpus.with_dependencies else [str(site), str(root / "migrations")]


def render(corpus: Corpus, root: Path, site: Path) -> tuple[list[Revision], list[str], str, float]:
    """Every revision's statements (via prosaas_migrate.offline), the stubbed modules, the
    renderer used and the seconds it took."""
    from prosaas_migrate import offline, revisions

    started = time.perf_counter()
    sys.path.append(str(site))
    finder = corpus_stubs.install(stub_folders(corpus, site, root))
    previous = Path.cwd()
    os.chdir(root)
    try:
        project = revisions.read_project(str(root / "alembic.ini"), "ALEMBIC_CONFIG")
        cfg, script = offline.load_script_directory(project, "ALEMBIC_CONFIG")
        selected, heads = offline.select(script, None)
        rendering = offline.render(cfg, script, selected, starting_heads=heads)
    finally:
        os.chdir(previous)
        sys.meta_path.remove(finder)
        sys.path.remove(str(site))
    out: list[Revision] = []
    for chunk in rendering.chunks:
        if chunk.revision is None:
            continue
        out.append(
            Revision(
                chunk.revision.revision, chunk.revision.path, statements(chunk.sql), chunk.error
            )
        )
    return out, sorted(corpus_stubs.STUBBED), rendering.renderer, time.perf_counter() - started


def statements(sql: str) -> list[str]:
    try:
        return [sql[piece] for piece in split(sql, with_parser=False, only_slices=True)]
    except ParseError:
        return [sql] if sql.strip() else []


_BEGIN = re.compile(r"^\s*(BEGIN|START\s+TRANSACTION)\b", re.IGNORECASE)
_VERSION_TABLE = re.compile(r"CREATE TABLE alembic_version\b", re.IGNORECASE)
_END = re.compile(r"^\s*(COMMIT|ROLLBACK|END)\b", re.IGNORECASE)


@dataclass(frozen=True)
class SqlFile:
    """A revision's SQL as squawk reads it, and where each of its statements sits in it."""

    revision: Revision
    text: str
    spans: tuple[tuple[int, int, int | None], ...]  # (start, stop, statement index or None)

    def statement_at(self, line: int, column: int) -> tuple[int | None, str]:
        """The statement index (None: BEGIN/COMMIT added here) and text at a 0-based position."""
        offset = sum(len(text) + 1 for text in self.text.split("\n")[:line]) + column
        for start, stop, index in self.spans:
            if start <= offset < stop:
                return index, normalized(self.text[start:stop])
        return None, ""


def write_sql_files(revisions: Sequence[Revision], folder: Path) -> dict[str, SqlFile]:
    """One file per rendered revision, with the transaction state it really runs in."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    files: dict[str, SqlFile] = {}
    open_at_start = True  # the session's BEGIN comes before the first revision
    for number, revision in enumerate(revisions):
        if revision.error is not None:
            open_at_start = True  # a new session begins after a revision that failed
            continue
        parts: list[tuple[str, int | None]] = [("BEGIN", None)] if open_at_start else []
        is_open = open_at_start
        for index, text in enumerate(revision.statements):
            sql = lint._without_comments(text).strip().rstrip(";").strip()
            if not sql or _VERSION_TABLE.match(normalized(sql)):
                continue  # Alembic's own table, created before the first revision's SQL
            parts.append((sql, index))
            if _BEGIN.match(sql):
                is_open = True
            elif _END.match(sql):
                is_open = False
        if is_open:
            parts.append(("COMMIT", None))
        text, spans = "", []
        for sql, at in parts:
            spans.append((len(text), len(text) + len(sql) + 1, at))
            text += f"{sql};\n\n"
        name = f"{number:04d}_{revision.id}.sql"
        (folder / name).write_text(text)
        files[name] = SqlFile(revision, text, tuple(spans))
        open_at_start = is_open
    return files


def normalized(text: str) -> str:
    return " ".join(lint._without_comments(text).split()).rstrip(";").strip()


# -- the two tools ---------------------------------------------------------------------------


def squawk_binary() -> Path:
    squawk = VENV_BIN / "squawk"
    version = ""
    if squawk.exists():
        version = subprocess.run([str(squawk), "--version"], capture_output=True, text=True).stdout
    if SQUAWK_VERSION not in version:
        pip("install", f"squawk-cli=={SQUAWK_VERSION}")
    return squawk


def run_squawk(
    squawk: Path, folder: Path, files: dict[str, SqlFile]
) -> tuple[list[Finding], float]:
    argv = [str(squawk), "--reporter", "json", "--pg-version", PG_VERSION, *sorted(files)]
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=folder, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode not in (0, 1):
        raise RuntimeError(f"squawk exited {result.returncode}: {result.stderr[-2000:]}")
    found = []
    for violation in json.loads(result.stdout or "[]"):
        sql_file = files[os.path.basename(violation["file"])]
        index, text = sql_file.statement_at(violation["line"], violation["column"])
        revision = sql_file.revision
        rule = violation["rule_name"]
        found.append(
            Finding(
                "squawk",
                rule,
                SQUAWK_CATEGORIES.get(rule, (f"squawk:{rule}",)),
                revision.id,
                index,
                text,
                violation.get("message", ""),
            )
        )
    return found, elapsed


def index_of(text: str, revision: Revision, taken: set[int] | None = None) -> int | None:
    """The index of the revision's statement whose text is `text` (or starts with it, when lint
    shortened it with ...); a statement already taken is used only when nothing else fits."""
    prefix = text[:-3] if text.endswith("...") else None
    fits = [
        index
        for index, statement in enumerate(revision.statements)
        if (normalized(statement) == text)
        or (prefix is not None and normalized(statement).startswith(prefix))
    ]
    free = [index for index in fits if taken is None or index not in taken]
    found = free or fits
    return found[0] if found else None


def run_lint(
    corpus: Corpus, root: Path, site: Path, revisions: Sequence[Revision]
) -> tuple[list[Finding], float]:
    stubs = root / "stubs"
    stubs.mkdir(exist_ok=True)
    shutil.copy(Path(corpus_stubs.__file__), stubs / "sitecustomize.py")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MIGRATION_", "DATABASE_", "ALEMBIC_", "RUN_MIGRATIONS"))
    }
    env["PYTHONPATH"] = str(stubs)
    env["PROSAAS_CORPUS_SITE"] = str(site)
    env["PROSAAS_CORPUS_STUB_FOR"] = os.pathsep.join(stub_folders(corpus, site, root))
    argv = [str(VENV_BIN / "prosaas-migrate"), "lint", "--json"]
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode not in (0, 1):
        raise RuntimeError(f"lint exited {result.returncode}: {result.stderr[-2000:]}")
    by_id = {revision.id: revision for revision in revisions}
    found = []
    taken: dict[tuple[str, str], set[int]] = defaultdict(set)
    for item in json.loads(result.stdout)["findings"]:
        revision = by_id.get(item["revision"])
        text = normalized(item["statement"])
        index = None
        if revision is not None and text:
            index = index_of(text, revision, taken[(item["revision"], item["rule"])])
            if index is not None:
                taken[(item["revision"], item["rule"])].add(index)
        rule = item["rule"]
        found.append(
            Finding(
                "lint",
                rule,
                (LINT_CATEGORIES.get(rule, f"lint:{rule}"),),
                item["revision"],
                index,
                text,
                item["message"],
            )
        )
    return found, elapsed


# -- comparing -------------------------------------------------------------------------------


def compare(outcome: Outcome) -> None:
    """Pair findings on the same statement that share a category; the rest is one-sided."""
    open_lint: dict[tuple[str, int | None], list[Finding]] = defaultdict(list)
    for finding in outcome.lint:
        open_lint[(finding.revision, finding.statement)].append(finding)
    matched: dict[int, Finding] = {}  # id(lint finding) -> its first squawk partner
    # The most specific squawk rule pairs first (constraint-missing-not-valid stands for three
    # categories; disallowed-unique-constraint for one), so the pairs name the closest rules.
    for finding in sorted(outcome.squawk, key=lambda f: len(f.categories)):
        candidates = open_lint[(finding.revision, finding.statement)]
        partner = next((c for c in candidates if c.categories[0] in finding.categories), None)
        if partner is not None:
            candidates.remove(partner)
            matched[id(partner)] = finding
            outcome.agreed.append((partner, finding))
            continue
        again = any(
            lint.revision == finding.revision
            and lint.statement == finding.statement
            and lint.categories[0] in finding.categories
            for lint, _ in outcome.agreed
        )
        if again:
            outcome.squawk_repeats += 1
        else:
            outcome.squawk_only.append(finding)
    outcome.lint_only = [f for f in outcome.lint if id(f) not in matched]


def created_before(revision: Revision, index: int | None) -> set[str]:
    """Tables (bare names) created by the revision's statements before `index`."""
    names: set[str] = set()
    for text in revision.statements[: index or 0]:
        for node in _parsed(text):
            if isinstance(node, ast.CreateStmt) and node.relation and not node.if_not_exists:
                names.add(str(node.relation.relname))
    return names


def indexes_created_before(revision: Revision, index: int | None) -> set[str]:
    names: set[str] = set()
    for text in revision.statements[: index or 0]:
        for node in _parsed(text):
            if isinstance(node, ast.IndexStmt) and node.idxname:
                names.add(str(node.idxname))
    return names


def stable_value_default(text: str) -> bool:
    """Whether every column the statement adds has a default that is an SQL value function."""
    defaults = [
        constraint.raw_expr
        for node in _parsed(text)
        if isinstance(node, ast.AlterTableStmt)
        for command in node.cmds or ()
        if isinstance(command, ast.AlterTableCmd) and isinstance(command.def_, ast.ColumnDef)
        for constraint in command.def_.constraints or ()
        if isinstance(constraint, ast.Constraint) and constraint.raw_expr is not None
    ]
    return bool(defaults) and all(isinstance(d, ast.SQLValueFunction) for d in defaults)


def dropped_index(text: str) -> str | None:
    for node in _parsed(text):
        if isinstance(node, ast.DropStmt) and node.objects:
            return str(node.objects[0][-1].sval)
    return None


def target_table(text: str) -> str | None:
    for node in _parsed(text):
        relation = getattr(node, "relation", None)
        if isinstance(relation, ast.RangeVar):
            return str(relation.relname)
    return None


def _parsed(text: str) -> Iterator[Any]:
    try:
        for raw in pglast.parse_sql(text):
            yield raw.stmt
    except ParseError:
        return


_FOREIGN_KEY_NAME = re.compile(r"DROP CONSTRAINT (IF EXISTS )?(fk_\w+|\w+_fkey)\b", re.IGNORECASE)


def judge(finding: Finding, revision: Revision | None) -> str:
    """True or false positive in our judgement, and how it was decided (mechanically, or by
    reading the examples: see VERDICTS)."""
    category = finding.categories[0]
    if category in OUT_OF_SCOPE:
        return OUT_OF_SCOPE[category]
    if revision is not None and category in TABLE_HAZARDS and finding.statement is not None:
        table = target_table(revision.statements[finding.statement])
        if table is not None and table in created_before(revision, finding.statement):
            return f"FP: {table} is created earlier in the same revision (empty, unused)"
    if (
        finding.rule == "adding-field-with-default"
        and finding.statement is not None
        and revision is not None
        and stable_value_default(revision.statements[finding.statement])
    ):
        return (
            "FP: the default is an SQL value function (CURRENT_TIMESTAMP, LOCALTIMESTAMP...), "
            "stable: PostgreSQL 11+ evaluates it once and does not rewrite the table (checked on "
            "15: the table's filenode stays; random() changes it)"
        )
    if finding.rule == "ban-drop-constraint" and _FOREIGN_KEY_NAME.search(finding.text):
        return (
            "FP: dropping a foreign key only relaxes what the running image's writes must meet "
            "(named like one: fk_... or ..._fkey), and holds no long lock"
        )
    if finding.rule == "require-concurrent-index-deletion" and revision is not None:
        index = dropped_index(finding.text)
        if index is not None and index in indexes_created_before(revision, finding.statement):
            return f"FP: {index} is created earlier in the same revision"
    key = (finding.tool, finding.rule)
    if key in VERDICTS:
        return VERDICTS[key]
    return "for a human: see the examples"


# What we concluded from reading the disagreements of the last run (the report prints examples
# next to each, so a reader can check).
VERDICTS: dict[tuple[str, str], str] = {
    ("squawk", "require-concurrent-index-deletion"): "TP (lint misses it): DROP INDEX takes "
    "ACCESS EXCLUSIVE on the table",
    ("squawk", "require-concurrent-reindex"): "TP (lint misses it): REINDEX holds SHARE on the "
    "table",
    ("squawk", "changing-column-type"): "FP: lint's replayed history knows the old type and "
    "the change is binary-coercible (no rewrite; each such pair is checked on a real server "
    "in tests/test_history.py)",
    ("lint", "backfill-under-lock"): "TP (squawk has no such rule): the DML runs while the same "
    "transaction holds a lock that queues the app on that table (an earlier ALTER TABLE)",
    ("squawk", "ban-drop-not-null"): "FP for a rolling deploy: the old image still writes every "
    "value; only readers that assume NOT NULL can break, once new code writes NULLs",
    ("squawk", "identifier-too-long"): "TP, not a lock hazard: PostgreSQL truncates the name to "
    "63 bytes, so a later migration naming it in full misses it",
    ("lint", "offline-render-failed"): "neither: the revision needs the application (or a "
    "database) to render, in this corpus's stub environment",
    ("lint", "lock-table"): "TP (squawk misses it): LOCK TABLE holds the lock to COMMIT",
    ("squawk", "ban-drop-constraint"): "for a human: no long lock (a catalog change under a "
    "brief ACCESS EXCLUSIVE); dropping a UNIQUE or PRIMARY KEY breaks the running image where "
    "its INSERT ... ON CONFLICT relies on it",
    ("squawk", "renaming-object"): "FP: renaming an index breaks no query of the running image "
    "(brief catalog lock)",
    ("squawk", "require-enum-value-ordering"): "scope: where ADD VALUE puts the new label is "
    "an ordering choice, no lock or compatibility hazard",
    ("squawk", "ban-drop-default"): "for a human: TP only where the running image inserts "
    "without that column and relies on the default",
    ("squawk", "ban-drop-sequence"): "for a human: TP where a column default of the running "
    "image still calls nextval() on it",
}


# -- reporting -------------------------------------------------------------------------------


def report(outcome: Outcome) -> None:
    c = outcome.corpus
    rendered = sum(r.error is None for r in outcome.revisions)
    where = c.note or c.versions
    print(f"\n=== {c.package} {c.version}: {len(outcome.revisions)} revisions ({where})")
    print(
        f"    rendered offline: {rendered}, failed: {len(outcome.revisions) - rendered}; "
        f"renderer: {outcome.renderer}; env.py: the stock `alembic init` one (the project's "
        "own imports the whole application)"
    )
    if outcome.stubbed:
        print(
            f"    stubbed (imported by the app's code, not installed): {', '.join(outcome.stubbed)}"
        )
    s = outcome.seconds
    print(
        f"    time: render {s['render']:.2f}s (in-process, once, for squawk); "
        f"squawk {s['squawk']:.2f}s on the rendered files; "
        f"lint {s['lint']:.2f}s (the whole command: it renders too)"
    )
    print(
        f"    findings: lint {len(outcome.lint)}, squawk {len(outcome.squawk)}; "
        f"agreements {len(outcome.agreed)} (+{outcome.squawk_repeats} squawk repeats of an "
        f"agreed finding on the same statement); lint only {len(outcome.lint_only)}; "
        f"squawk only {len(outcome.squawk_only)}"
    )
    revision_level = {"offline-render-failed", "unknown-allow", "syntax-error"}
    unlocated = [f for f in outcome.lint if f.statement is None and f.rule not in revision_level]
    unlocated += [f for f in outcome.squawk if f.statement is None]
    if unlocated:
        print(f"    not matched to a statement (compared as revision-wide): {len(unlocated)}")
    pairs = Counter((lint.rule, squawk.rule) for lint, squawk in outcome.agreed)
    print("    agreements by rule pair:")
    for (lint_rule, squawk_rule), count in pairs.most_common():
        print(f"      {count:5d}  {lint_rule} = {squawk_rule}")
    by_id = {r.id: r for r in outcome.revisions}
    for title, findings, other in (
        ("only lint", outcome.lint_only, outcome.squawk),
        ("only squawk", outcome.squawk_only, outcome.lint),
    ):
        print(f"    {title}:")
        groups: dict[tuple[str, str], list[Finding]] = defaultdict(list)
        for finding in findings:
            verdict = judge(finding, by_id.get(finding.revision))
            groups[(finding.rule, verdict)].append(finding)
        flagged = {f.revision for f in other if f.categories[0] not in OUT_OF_SCOPE}
        for (rule, verdict), group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            counterpart = partner_rules(rule, findings is outcome.lint_only)
            print(f"      {len(group):5d}  {rule} (other side: {counterpart}): {verdict}")
            revisions = {f.revision for f in group}
            if rule not in OUT_OF_SCOPE_RULES and (silent := len(revisions - flagged)):
                print(
                    f"               in {len(revisions)} revision(s); {silent} of them get no "
                    "finding at all from the other tool"
                )
            for example in group[:2]:
                print(
                    f"               {example.revision}: {shorten(example.text) or example.message}"
                )


def partner_rules(rule: str, is_lint: bool) -> str:
    if is_lint:
        category = LINT_CATEGORIES.get(rule, "")
        names = [name for name, cats in SQUAWK_CATEGORIES.items() if category in cats]
    else:
        categories = SQUAWK_CATEGORIES.get(rule, ())
        names = [name for name, cat in LINT_CATEGORIES.items() if cat in categories]
    return " / ".join(names) or "no rule"


def shorten(text: str, width: int = 150) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def run(corpus: Corpus, cache: Path, squawk: Path) -> Outcome:
    site = installed(corpus, cache)
    root = build_project(corpus, site, cache)
    corpus_stubs.STUBBED.clear()
    revisions, stubbed, renderer, render_seconds = render(corpus, root, site)
    files = write_sql_files(revisions, root / "sql")
    squawk_found, squawk_seconds = run_squawk(squawk, root / "sql", files)
    lint_found, lint_seconds = run_lint(corpus, root, site, revisions)
    outcome = Outcome(
        corpus,
        revisions,
        lint_found,
        squawk_found,
        {"render": render_seconds, "squawk": squawk_seconds, "lint": lint_seconds},
        stubbed,
        renderer,
    )
    compare(outcome)
    return outcome


def totals(outcomes: Sequence[Outcome]) -> None:
    print("\n=== total")
    print(
        f"    revisions {sum(len(o.revisions) for o in outcomes)}; findings: lint "
        f"{sum(len(o.lint) for o in outcomes)}, squawk {sum(len(o.squawk) for o in outcomes)}; "
        f"agreements {sum(len(o.agreed) for o in outcomes)} "
        f"(+{sum(o.squawk_repeats for o in outcomes)} squawk repeats); lint only "
        f"{sum(len(o.lint_only) for o in outcomes)}; squawk only "
        f"{sum(len(o.squawk_only) for o in outcomes)}"
    )
    verdicts: Counter[tuple[str, str, str]] = Counter()
    for o in outcomes:
        by_id = {r.id: r for r in o.revisions}
        for side, findings in (("lint", o.lint_only), ("squawk", o.squawk_only)):
            for finding in findings:
                verdicts[(side, finding.rule, judge(finding, by_id.get(finding.revision)))] += 1
    for (side, rule, verdict), count in sorted(verdicts.items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"      {count:5d}  only {side}: {rule}: {verdict}")
    seconds = {
        tool: sum(o.seconds[tool] for o in outcomes) for tool in ("render", "squawk", "lint")
    }
    print(
        f"    time: render {seconds['render']:.2f}s, squawk {seconds['squawk']:.2f}s, "
        f"lint {seconds['lint']:.2f}s"
    )


def main(argv: Sequence[str] = ()) -> None:
    wanted = set(argv)
    cache = cache_dir()
    squawk = squawk_binary()
    outcomes = []
    for corpus in CORPORA:
        if wanted and corpus.package not in wanted:
            continue
        outcome = run(corpus, cache, squawk)
        report(outcome)
        outcomes.append(outcome)
    totals(outcomes)


if __name__ == "__main__":
    main(sys.argv[1:])
