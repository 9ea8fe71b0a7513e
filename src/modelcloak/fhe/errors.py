"""The fhe room's error type."""

from modelcloak.errors import ModelcloakError


class FheError(ModelcloakError):
    """An FHE program, key set, package or ciphertext was refused; the message says which and why."""
