"""create call_recordings

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "call_recordings",
        sa.Column("call_sid", sa.Text, primary_key=True),
        sa.Column("business_id", sa.BigInteger, nullable=False, index=True),
        sa.Column("status", sa.Text, nullable=False, server_default="pending"),
        sa.Column("file", sa.Text),
        sa.Column("bytes", sa.BigInteger),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("call_recordings")
