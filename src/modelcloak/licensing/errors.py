"""The error type of talking to the owner backend, shared by the device side and the server."""

from modelcloak.errors import ModelcloakError


class OwnerError(ModelcloakError):
    """The owner backend refused or failed a request; the message says why."""
