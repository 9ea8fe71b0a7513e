"""The lock room's error type."""

from modelcloak.errors import ModelcloakError


class LockError(ModelcloakError):
    """Weights could not be locked or unlocked; the message says which tensor and why."""
