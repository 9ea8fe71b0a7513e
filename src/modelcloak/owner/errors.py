"""The owner room's error type (backend, licences, key release, evidence).

It is the licensing protocol's own type: a refusal reads the same on both sides of the wire.
"""

from modelcloak.licensing.errors import OwnerError

__all__ = ["OwnerError"]
