"""The evaluation room's one error type."""

from __future__ import annotations

from modelcloak.errors import ModelcloakError


class EvalError(ModelcloakError):
    """An evaluation cannot run as asked: bad targets, data that breaks the threat model, a budget too small."""
