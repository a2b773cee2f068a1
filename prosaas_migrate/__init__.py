"""Run Alembic migrations from one designated container under a PostgreSQL advisory lock."""

__version__ = "0.1.0"
