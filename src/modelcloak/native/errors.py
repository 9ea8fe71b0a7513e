"""The native enclave room's one error type."""

from modelcloak.errors import ModelcloakError


class NativeError(ModelcloakError):
    """The private part cannot be compiled to a native enclave, or the build failed; one line says why."""
