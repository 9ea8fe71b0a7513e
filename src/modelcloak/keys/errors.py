"""The keys room's error type."""

from modelcloak.errors import ModelcloakError


class KeyProviderError(ModelcloakError):
    """A key could not be produced, read or derived."""
