"""Alembic's cookbook env.py: run on the connection prosaas-migrate holds the lock on."""

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

# SQLAlchemy's name for psycopg 3; it reads a bare postgresql:// as psycopg2, and postgres:// not
# at all.
DRIVER_PREFIXES = ("postgres://", "postgresql://")


def from_environment(variable: str) -> str | None:
    """`variable`, or what the file named by `variable`_FILE holds (a Docker or Kubernetes
    secret), as prosaas-migrate reads them."""
    value, path = os.environ.get(variable, "").strip(), os.environ.get(f"{variable}_FILE", "")
    if not path.strip():
        return value or None
    if value:
        raise SystemExit(f"{variable} and {variable}_FILE are both set; set only one of them")
    try:
        with open(path.strip(), encoding="utf-8-sig") as secret:
            return secret.read().strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SystemExit(f"{variable}_FILE: cannot read {path.strip()!r}: {reason}") from None


def shell_url() -> str:
    """The URL for plain `alembic upgrade head`, in prosaas-migrate's order of precedence."""
    for variable in ("MIGRATION_DATABASE_URL", "DATABASE_URL"):
        url = from_environment(variable)
        if url:
            break
    else:
        url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit(
            "Set DATABASE_URL (postgresql://user:password@host:5432/dbname), or DATABASE_URL_FILE"
            " to the path of a file holding it"
        )
    for prefix in DRIVER_PREFIXES:
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()
        return
    # Plain `alembic upgrade head`, for a developer at a shell.
    engine = create_engine(shell_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
