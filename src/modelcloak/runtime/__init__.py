"""The runtime room: device-side sessions that verify, decrypt in memory and run.

Entry points are `modelcloak.InferenceSession` and `modelcloak.load` (modelcloak.inference),
which dispatch to the scheme modules; this room holds what they share.
"""

from modelcloak.runtime.errors import EnclaveError, SessionError
from modelcloak.runtime.session import FheSession, LoadReport, Session, SplitSession

__all__ = ["EnclaveError", "FheSession", "LoadReport", "Session", "SessionError", "SplitSession"]
