"""Alembic environment: migrations run on the connection `modelcloak.owner.store.migrate` passes in."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run owner migrations through modelcloak.owner.store.migrate(engine)")

context.configure(connection=connection, target_metadata=None, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
