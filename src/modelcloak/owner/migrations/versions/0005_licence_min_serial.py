"""Licences can pin the oldest bundle serial their devices may run (issue 15's rollback protection).

Revision ID: 0005
Revises: 0004

Existing licences get no pin (NULL), and their integrity tags stay valid: the tag covers
`min_serial` only when it is set (modelcloak/owner/integrity.py).
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("licences") as batch:
        batch.add_column(sa.Column("min_serial", sa.BigInteger, nullable=True))


def downgrade() -> None:
    raise NotImplementedError("the owner store is not downgraded: restore a backup instead")
