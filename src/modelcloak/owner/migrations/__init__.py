"""Alembic migrations of the owner store; `modelcloak.owner.store.migrate` runs them."""
