"""FHE decryption: the owner's CKKS secret for a registered model, sealed under the master key.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fhe_secrets",
        sa.Column("model_id", sa.String(128), sa.ForeignKey("models.id"), primary_key=True),
        sa.Column("fhe_model_id", sa.String(64), nullable=False),
        sa.Column("sealed_secret", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("fhe_secrets")
