"""lint's reporting: the line each finding comes from, an env.py whose offline branch renders
nothing, the hints for revisions written for a live connection, and the CI formats (GitHub
annotations, pre-commit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prosaas_migrate import lint
from tests.conftest import cli
from tests.test_lint import lint_at, new_project, rules, write_revision

ROOT = Path(__file__).resolve().parent.parent


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of the first line of `path` containing `needle`."""
    lines = path.read_text().splitlines()
    return next(number for number, text in enumerate(lines, 1) if needle in text)


# -- which line of the revision wrote the statement --------------------------------------------


@pytest.mark.parametrize("env", ["stock", "cookbook"])
def test_each_finding_names_the_line_of_the_operation_that_wrote_it(
    tmp_path: Path, env: str
) -> None:
    root = new_project(tmp_path, env=env)
    path = write_revision(
        root,
        "r002",
        "r001",
        """
        op.add_column("t", sa.Column("c", sa.Integer))  # safe: no finding
        op.create_index(
            "ix_t_b",
            "t",
            ["b"],
        )
        op.execute("ALTER TABLE t DROP COLUMN a")
        """,
    )
    report = lint_at(root)
    assert rules(report) == [("r002", "index-not-concurrent"), ("r002", "drop-column")]
    index, drop = report.findings
    assert index.line == line_of(path, "op.create_index(")  # where the call starts
    assert drop.line == line_of(path, "DROP COLUMN")


def test_a_helper_function_in_the_revision_is_the_line_inside_it(tmp_path: Path) -> None:
    """The innermost frame of the revision file: the helper's line, the one to fix."""
    root = new_project(tmp_path)
    path = write_revision(
        root,
        "r002",
        "r001",
        "index_on('b')",
        header=(
            "\n\ndef index_on(column: str) -> None:\n"
            "    op.create_index(f'ix_t_{column}', 't', [column])\n"
        ),
    )
    (finding,) = lint_at(root).findings
    assert finding.line == line_of(path, "op.create_index(")


def test_each_statement_of_one_execute_is_at_its_line(tmp_path: Path) -> None:
    """op.execute("A; B"): B is written by the same call as A, so it is at the same line."""
    root = new_project(tmp_path)
    path = write_revision(
        root,
        "r002",
        "r001",
        """
        op.add_column("t", sa.Column("c", sa.Integer))
        op.execute("UPDATE t SET c = 0; CREATE INDEX ix_t_b ON t (b)")
        """,
    )
    report = lint_at(root)
    assert rules(report) == [("r002", "backfill-under-lock"), ("r002", "index-not-concurrent")]
    assert [f.line for f in report.findings] == [line_of(path, "UPDATE t")] * 2


@pytest.mark.parametrize("env", ["stock", "cookbook"])
def test_a_revision_that_fails_offline_names_its_file_and_line(tmp_path: Path, env: str) -> None:
    root = new_project(tmp_path, env=env)
    path = write_revision(root, "r002", "r001", "x = 1\nraise RuntimeError('needs the app')")
    (finding,) = lint_at(root).findings
    assert finding.rule == "offline-render-failed"
    line = line_of(path, "raise RuntimeError")
    assert finding.line == line
    assert f"RuntimeError: needs the app (at {Path('migrations/versions/r002.py')}:{line})" in (
        finding.message
    )


AUTOCOMMIT_THROUGH_THE_BIND = """\
with op.get_context().autocommit_block():
    op.get_bind().exec_driver_sql("CREATE INDEX CONCURRENTLY ix_t_b ON t (b)")
"""
READING_THROUGH_THE_BIND = """\
rows = op.get_bind().execute(sa.text("SELECT count(*) FROM t")).scalar()
"""
INSPECTING_THROUGH_THE_BIND = """\
if "c" not in [column["name"] for column in sa.inspect(op.get_bind()).get_columns("t")]:
    op.add_column("t", sa.Column("c", sa.Integer))
"""


@pytest.mark.parametrize("env", ["stock", "cookbook"])
def test_the_get_bind_idioms_get_a_hint_that_says_what_to_do(tmp_path: Path, env: str) -> None:
    root = new_project(tmp_path, env=env)
    write_revision(root, "r002", "r001", AUTOCOMMIT_THROUGH_THE_BIND)
    write_revision(root, "r003", "r002", READING_THROUGH_THE_BIND)
    write_revision(root, "r004", "r003", INSPECTING_THROUGH_THE_BIND)
    write_revision(root, "r005", "r004", "raise KeyError('other')")
    autocommit, reading, inspecting, other = lint_at(root).findings
    assert autocommit.hint.startswith("op.get_bind() has no exec_driver_sql() offline")
    assert "op.execute(sa.text(...))" in autocommit.hint
    assert "autocommit_block()" in autocommit.hint
    assert "context.is_offline_mode()" in reading.hint
    assert inspecting.hint.startswith("upgrade() inspects the database (sa.inspect(")
    assert other.hint == lint.RULES["offline-render-failed"].hint  # nothing known: the rule's


def test_the_hinted_fix_really_renders_and_is_clean(tmp_path: Path) -> None:
    """The hint's way (op.execute in an autocommit_block) renders offline and passes lint."""
    root = new_project(tmp_path)
    write_revision(
        root,
        "r002",
        "r001",
        "with op.get_context().autocommit_block():\n"
        '    op.execute(sa.text("CREATE INDEX CONCURRENTLY ix_t_b ON t (b)"))',
    )
    report = lint_at(root)
    assert report.findings == []
    assert report.revisions_checked == 2


# -- an env.py whose offline branch renders nothing ---------------------------------------------

OFFLINE_BRANCH = "def run_migrations_offline() -> None:\n"
ONLY_LOGS = (
    "def run_migrations_offline() -> None:\n"
    "    import logging\n"
    "    logging.getLogger('alembic.env').info('offline mode is not supported')\n"
    "\n\n"
    "def _unused_offline() -> None:\n"
)
OWN_FILE = (
    "def run_migrations_offline() -> None:\n"
    "    url = config.get_main_option('sqlalchemy.url')\n"
    "    with open(os.devnull, 'w') as sink:\n"
    "        context.configure(url=url, literal_binds=True, output_buffer=sink,\n"
    "                          dialect_opts={'paramstyle': 'named'})\n"
    "        with context.begin_transaction():\n"
    "            context.run_migrations()\n"
    "\n\n"
    "def _unused_offline() -> None:\n"
)


@pytest.mark.parametrize(
    ("branch", "note"),
    [
        (ONLY_LOGS, "env.py's offline branch rendered no revision (it never ran the migrations)"),
        (
            OWN_FILE,
            "env.py's offline branch wrote no SQL where Alembic wrote it (not to its output)",
        ),
    ],
    ids=["only-logs", "writes-elsewhere"],
)
def test_an_offline_branch_that_renders_nothing_falls_back_and_says_so(
    tmp_path: Path, branch: str, note: str
) -> None:
    root = new_project(tmp_path)
    env_py = root / "migrations" / "env.py"
    assert OFFLINE_BRANCH in env_py.read_text()
    env_py.write_text("import os\n" + env_py.read_text().replace(OFFLINE_BRANCH, branch))
    write_revision(root, "r002", "r001", 'op.create_index("ix_t_b", "t", ["b"])')
    report = lint_at(root)
    assert (report.renderer, report.renderer_note) == ("prosaas-migrate", note)
    assert rules(report) == [("r002", "index-not-concurrent")]
    result = cli(["lint"], {}, root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"(rendered with prosaas-migrate's offline context: {note})" in result.stdout


def test_an_empty_revision_is_no_reason_to_fall_back(tmp_path: Path) -> None:
    """A revision whose upgrade() is `pass` still gets its version row: env.py stays."""
    root = new_project(tmp_path)
    write_revision(root, "r002", "r001", "pass")
    report = lint_at(root)
    assert (report.renderer, report.renderer_note) == ("env.py", None)


# -- GitHub annotations --------------------------------------------------------------------------


def test_format_github_annotates_each_finding_at_its_file_and_line(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    path = write_revision(
        root,
        "r002",
        "r001",
        'op.create_index("ix_t_b", "t", ["b"])\nop.execute("DROP TABLE w /* 100%, gone */")',
    )
    result = cli(["lint", "--format", "github"], {}, root)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, lines
    file = Path("migrations/versions/r002.py")
    index = line_of(path, "create_index")
    assert lines[0].startswith(
        f"::error file={file},line={index},title=prosaas-migrate lint%3A index-not-concurrent::"
    )
    assert "(lock: SHARE on t). Fix: CREATE INDEX CONCURRENTLY" in lines[0]
    assert lines[0].endswith("%0ACREATE INDEX ix_t_b ON t (b)")
    # SQL comments are gone from the statement, as in the text output
    assert lines[1].startswith(f"::error file={file},line={line_of(path, 'DROP TABLE')},")
    assert "%0ADROP TABLE w" in lines[1]
    assert lines[2] == "2 findings in 1 of 2 revisions checked"


def test_github_escaping_follows_the_actions_toolkit() -> None:
    assert lint._github_data("100% a\r\nb") == "100%25 a%0D%0Ab"
    assert lint._github_property("a:b,c%") == "a%3Ab%2Cc%25"


def test_format_github_with_nothing_found_prints_the_summary_only(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    result = cli(["lint", "--format", "github"], {}, root)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "no findings in 1 revision checked\n"


@pytest.mark.parametrize("fmt", ["text", "github"])
def test_json_and_another_format_is_a_usage_error(tmp_path: Path, fmt: str) -> None:
    root = new_project(tmp_path)
    result = cli(["lint", "--json", "--format", fmt], {}, root)
    assert result.returncode == 2
    assert f"--json and --format {fmt} contradict each other" in result.stderr
    assert "Traceback" not in result.stderr


def test_format_json_is_the_json_document_with_lines(tmp_path: Path) -> None:
    root = new_project(tmp_path)
    path = write_revision(root, "r002", "r001", 'op.create_index("ix_t_b", "t", ["b"])')
    both = [cli(["lint", *args], {}, root) for args in (["--json"], ["--format", "json"])]
    assert both[0].stdout == both[1].stdout
    (finding,) = json.loads(both[0].stdout)["findings"]
    assert finding["line"] == line_of(path, "create_index")


# -- pre-commit -----------------------------------------------------------------------------------


def test_the_pre_commit_hooks_file_is_valid_for_pre_commit() -> None:
    from pre_commit.clientlib import load_manifest

    hooks = {hook["id"]: hook for hook in load_manifest(str(ROOT / ".pre-commit-hooks.yaml"))}
    assert set(hooks) == {"prosaas-migrate-lint", "prosaas-migrate-lint-system"}
    assert hooks["prosaas-migrate-lint"]["language"] == "python"
    # "system", which pre-commit 4.4 renamed "unsupported" (the old name stays an alias)
    assert hooks["prosaas-migrate-lint-system"]["language"] in {"system", "unsupported"}
    for hook in hooks.values():
        assert hook["entry"] == "prosaas-migrate lint"
        assert hook["pass_filenames"] is False  # lint reads the whole history, not files


def git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=root,
        check=True,
        capture_output=True,
    )


def test_pre_commit_runs_the_system_hook_and_fails_the_commit(tmp_path: Path) -> None:
    """The README's recipe, run by pre-commit itself, against a project in its own git repo."""
    bindir = Path(sys.executable).parent
    assert (bindir / "pre-commit").exists() and (bindir / "prosaas-migrate").exists()
    hooks = tmp_path / "hooks"  # this repository's hooks file, as a repo pre-commit can read
    hooks.mkdir()
    shutil.copy(ROOT / ".pre-commit-hooks.yaml", hooks)
    git(hooks, "init", "-q")
    git(hooks, "add", ".")
    git(hooks, "commit", "-q", "-m", "hooks")
    rev = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=hooks, check=True, capture_output=True, text=True
    ).stdout.strip()
    root = new_project(tmp_path / "app")
    (root / ".pre-commit-config.yaml").write_text(
        f"repos:\n  - repo: {hooks}\n    rev: {rev}\n"
        "    hooks:\n      - id: prosaas-migrate-lint-system\n"
    )
    git(root, "init", "-q")
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "PRE_COMMIT_HOME": str(tmp_path / "cache"),
    }
    env.pop("ALEMBIC_CONFIG", None)

    def commit() -> subprocess.CompletedProcess[str]:
        git(root, "add", ".")
        return subprocess.run(
            [str(bindir / "pre-commit"), "run", "--all-files"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    clean = commit()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "prosaas-migrate lint" in clean.stdout and "Passed" in clean.stdout
    write_revision(root, "r002", "r001", 'op.create_index("ix_t_b", "t", ["b"])')
    dirty = commit()
    assert dirty.returncode == 1, dirty.stdout + dirty.stderr
    assert "Failed" in dirty.stdout and "index-not-concurrent" in dirty.stdout
