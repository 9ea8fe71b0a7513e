"""The owner room's error type (backend, licences, key release, evidence).

It is the licensing protocol's own type: a refusal reads the same on both sides of the wire.
"""

from modelcloak.licensing.errors import OwnerError

__all__ = ["DatabaseUnavailable", "OwnerError"]


class DatabaseUnavailable(OwnerError):
    """The database could not be reached or failed a transaction; the API answers 503 and logs the cause."""

    retryable = False  # True for a deadlock or serialisation failure: nothing was written, try again
