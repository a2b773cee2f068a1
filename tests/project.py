"""Fixture Alembic projects: the stock `alembic init` layout, or the cookbook shared-connection one.

Every revision inserts its id into a `revision_log` table (no unique key), so a test can prove
each revision ran exactly once.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from alembic import command
from alembic.config import Config

COOKBOOK_ENV = """\
from logging.config import fileConfig

from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection", None)
    if connectable is None:
        connectable = engine_from_config(
            config.get_section(config.config_ini_section, {}),
            prefix="sqlalchemy.",
            poolclass=pool.NullPool,
        )
        with connectable.connect() as connection:
            context.configure(connection=connection, target_metadata=None)
            with context.begin_transaction():
                context.run_migrations()
    else:
        context.configure(connection=connectable, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
"""


@dataclass
class Revision:
    """One revision: its SQL (or Python) body runs before the revision_log insert."""

    id: str
    sql: list[str] = field(default_factory=list)
    python: str = ""
    message: str = ""


def linear(count: int, *, slow_seconds: float = 0.0) -> list[Revision]:
    """`count` revisions r001..rNNN, each creating a table; the first one optionally sleeps."""
    revisions = []
    for n in range(1, count + 1):
        sql = [f"CREATE TABLE t{n:03d} (id int)"]
        if n == 1 and slow_seconds:
            sql.insert(0, f"SELECT pg_sleep({slow_seconds})")
        revisions.append(Revision(f"r{n:03d}", sql=sql, message=f"create t{n:03d}"))
    return revisions


def create(
    root: Path, revisions: list[Revision], *, env: str = "cookbook", url: str | None = None
) -> Path:
    """Write an Alembic project under `root`; return its alembic.ini path.

    env="stock" keeps what `alembic init` writes (its own engine, fileConfig, the placeholder
    URL unless `url` is given); env="cookbook" uses config.attributes["connection"].
    """
    root.mkdir(parents=True, exist_ok=True)
    ini = root / "alembic.ini"
    command.init(Config(str(ini)), str(root / "migrations"), template="generic")
    if env == "cookbook":
        (root / "migrations" / "env.py").write_text(COOKBOOK_ENV)
    if url is not None:
        text = ini.read_text().replace(
            "driver://user:pass@localhost/dbname", url.replace("%", "%%")
        )
        ini.write_text(text)
    write_revisions(root, revisions)
    return ini


def write_revisions(root: Path, revisions: list[Revision]) -> None:
    versions = root / "migrations" / "versions"
    down: str | None = None
    for revision in revisions:
        body = [f"op.execute({statement!r})" for statement in revision.sql]
        body.append(
            "op.execute('CREATE TABLE IF NOT EXISTS revision_log "
            "(revision text, applied_at timestamptz DEFAULT clock_timestamp())')"
        )
        body.append(f"op.execute(\"INSERT INTO revision_log VALUES ('{revision.id}')\")")
        source = f'''\
"""{revision.message or revision.id}"""
from alembic import op

revision = {revision.id!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
{textwrap.indent(revision.python, "    ")}
{textwrap.indent(chr(10).join(body), "    ")}


def downgrade() -> None:
    raise RuntimeError("the runner must never downgrade")
'''
        (versions / f"{revision.id}.py").write_text(source)
        down = revision.id
