"""`prosaas-migrate lint` on 1,000 revisions against `alembic upgrade base:heads --sql`.

Both render the same project offline through its env.py; lint also parses every statement with
pglast and applies its rules, so the ratio says how much the checking adds to the rendering.
Run on its own with `.venv/bin/python -m benchmarks.lint` (BENCH_ROUNDS, default 15; no server).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

from benchmarks.run import ALEMBIC, compare
from tests import project
from tests.conftest import BIN, clean_env

REVISIONS = 1000

# A mix of what real revisions do, about half of it unsafe: op.* calls and raw SQL, and an
# allow comment in one revision of five (those files are tokenized to read it).
_BODIES = (
    """\
    op.create_table(
        "t{n}",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
    op.create_index("ix_t{n}_name", "t{n}", ["name"])""",
    """\
    op.add_column("t{m}", sa.Column("score", sa.Integer, nullable=True))
    with op.get_context().autocommit_block():
        op.create_index("ix_t{m}_score", "t{m}", ["score"], postgresql_concurrently=True)""",
    """\
    op.execute("UPDATE t{m} SET name = lower(name) WHERE name <> lower(name)")
    # prosaas-migrate: allow index-not-concurrent: t{m} is small
    op.execute("CREATE INDEX ix_t{m}_lower ON t{m} (lower(name))")""",
    """\
    op.alter_column("t{m}", "name", type_=sa.String(200))
    op.create_foreign_key("fk_t{m}_t{k}", "t{m}", "t{k}", ["id"], ["id"], postgresql_not_valid=True)
    op.create_check_constraint("ck_t{m}_id", "t{m}", "id > 0")""",
    """\
    op.add_column("t{m}", sa.Column("token", sa.Uuid, server_default=sa.text("gen_random_uuid()")))
    op.drop_column("t{m}", "score")
    op.execute("ALTER TABLE t{m} RENAME COLUMN token TO public_id")""",
)


def write_project(root: Path, count: int = REVISIONS) -> Path:
    """A stock `alembic init` project (offline branch in env.py) with `count` revisions."""
    ini = project.create(root, [], env="stock", url="postgresql://bench@127.0.0.1:1/bench")
    versions = root / "migrations" / "versions"
    down: str | None = None
    for n in range(1, count + 1):
        first_of_five = n - (n - 1) % 5  # each group of five revisions works on one table
        body = _BODIES[(n - 1) % 5].format(n=n, m=first_of_five, k=max(1, first_of_five - 5))
        revision = f"r{n:04d}"
        (versions / f"{revision}.py").write_text(
            f'"""revision {n}"""\n'
            "import sqlalchemy as sa\n"
            "from alembic import op\n\n"
            f"revision = {revision!r}\n"
            f"down_revision = {down!r}\n"
            "branch_labels = None\n"
            "depends_on = None\n\n\n"
            "def upgrade() -> None:\n"
            f"{textwrap.indent(textwrap.dedent(body), '    ')}\n"
        )
        down = revision
    return ini


def timed_any(argv: list[str], env: dict[str, str], cwd: Path, expect: int) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != expect:
        raise RuntimeError(f"{argv} exited {result.returncode}: {result.stderr.decode()[-2000:]}")
    return elapsed


def bench_lint(work: Path, rounds: int) -> None:
    app = work / "lint"
    write_project(app)
    env = clean_env()
    compare(
        f"lint on {REVISIONS:,} revisions vs alembic upgrade base:heads --sql",
        "<= 1.0x",
        lambda: timed_any([str(BIN), "lint"], env, app, expect=1),
        lambda: timed_any([str(ALEMBIC), "upgrade", "base:heads", "--sql"], env, app, expect=0),
        max(3, rounds // 3),
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bench_lint(Path(tmp), int(os.environ.get("BENCH_ROUNDS", "15")))


if __name__ == "__main__":
    main()
