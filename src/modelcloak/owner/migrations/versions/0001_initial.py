"""The owner store's first schema: models, devices, licences, instances, nonces, usage, audit log.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("sealed_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("verifier_kind", sa.String(32), nullable=False),
        sa.Column("identity", sa.String(256), nullable=True),
        sa.Column("expected_measurements", sa.Text, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
    )
    op.create_table(
        "licences",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model_id", sa.String(128), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id"), nullable=True),
        sa.Column("max_instances", sa.Integer, nullable=True),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.Column("query_quota", sa.BigInteger, nullable=True),
        sa.Column("queries_used", sa.BigInteger, nullable=False),
        sa.Column("revalidate_seconds", sa.Integer, nullable=False),
        sa.Column("offline_grace_seconds", sa.Integer, nullable=False),
        sa.Column("allow_sim", sa.Boolean, nullable=False),
        sa.Column("allow_debug", sa.Boolean, nullable=False),
        sa.Column("expected_measurements", sa.Text, nullable=True),
        sa.Column("sealed_usage_key", sa.LargeBinary, nullable=False),
        sa.Column("revoked_at", _TIME, nullable=True),
        sa.Column("revocation_reason", sa.Text, nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.CheckConstraint("queries_used >= 0", name="ck_licences_used_nonnegative"),
        sa.CheckConstraint("query_quota IS NULL OR queries_used <= query_quota", name="ck_licences_within_quota"),
    )
    op.create_table(
        "instances",
        sa.Column("licence_id", sa.String(64), sa.ForeignKey("licences.id"), primary_key=True),
        sa.Column("instance_id", sa.String(128), primary_key=True),
        sa.Column("device_id", sa.String(128), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("first_seen", _TIME, nullable=False),
        sa.Column("last_seen", _TIME, nullable=False),
    )
    op.create_table(
        "nonces",
        sa.Column("value", sa.String(64), primary_key=True),
        sa.Column("licence_id", sa.String(64), sa.ForeignKey("licences.id"), nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.Column("used_at", _TIME, nullable=True),
    )
    op.create_index("ix_nonces_expires_at", "nonces", ["expires_at"])
    op.create_table(
        "usage_streams",
        sa.Column("licence_id", sa.String(64), sa.ForeignKey("licences.id"), primary_key=True),
        sa.Column("reporter_id", sa.String(128), primary_key=True),
        sa.Column("last_sequence", sa.BigInteger, nullable=False),
        sa.Column("queries", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "usage_batches",
        sa.Column("licence_id", sa.String(64), sa.ForeignKey("licences.id"), primary_key=True),
        sa.Column("reporter_id", sa.String(128), primary_key=True),
        sa.Column("sequence", sa.BigInteger, primary_key=True),
        sa.Column("queries", sa.BigInteger, nullable=False),
        sa.Column("mac", sa.LargeBinary, nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    # The database itself refuses to rewrite history, for anyone who connects without our engine.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION modelcloak_audit_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'the audit log is append-only';
            END;
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION modelcloak_audit_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION modelcloak_audit_append_only()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_log_no_{action.lower()} BEFORE {action} ON audit_log "
                "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
            )


def downgrade() -> None:
    raise NotImplementedError("the owner store is not downgraded: restore a backup instead")
