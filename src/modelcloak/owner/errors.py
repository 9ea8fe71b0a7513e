"""The owner room's error type (backend, licences, key release, evidence)."""

from modelcloak.errors import ModelcloakError


class OwnerError(ModelcloakError):
    """The owner backend refused or failed a request; the message says why."""


class DatabaseUnavailable(OwnerError):
    """The database could not be reached or failed a transaction; the API answers 503 and logs the cause."""

    retryable = False  # True for a deadlock or serialisation failure: nothing was written, try again
