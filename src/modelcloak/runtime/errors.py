"""The runtime room's error type."""

from modelcloak.errors import ModelcloakError


class SessionError(ModelcloakError):
    """Loading or running a protected model on the device failed."""
