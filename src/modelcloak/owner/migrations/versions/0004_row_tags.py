"""Integrity tags (HMAC under a master-key subkey) on the rows that grant access: licences and devices.

Revision ID: 0004
Revises: 0003

Rows that exist before this revision have no tag and are refused until the owner tags them with
`modelcloak owner migrate --master-key-file ...` (the migration itself never sees the master key).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("devices", "licences"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("row_tag", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    raise NotImplementedError("the owner store is not downgraded: restore a backup instead")
