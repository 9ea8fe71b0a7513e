"""The model room's error type."""

from modelcloak.errors import ModelcloakError


class ModelError(ModelcloakError):
    """A model could not be imported, validated or described."""
