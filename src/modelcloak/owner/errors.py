"""The owner room's error type (backend, licences, key release, evidence)."""

from modelcloak.errors import ModelcloakError


class OwnerError(ModelcloakError):
    """The owner backend refused or failed a request; the message says why."""
