"""Tenants: a device belongs to a customer, and an instance licence admits only that customer's devices.

Revision ID: 0003
Revises: 0002

Instance licences issued before this revision have no customer; the backend refuses to release
keys through them until they are reissued with `--customer` (docs/OWNER.md, "Licences").
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("customer", sa.String(128), nullable=True))
    with op.batch_alter_table("licences") as batch:
        batch.add_column(sa.Column("customer", sa.String(128), nullable=True))


def downgrade() -> None:
    raise NotImplementedError("the owner store is not downgraded: restore a backup instead")
