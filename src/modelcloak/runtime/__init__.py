"""The runtime room: the device-side session that verifies, decrypts in memory and runs."""

from modelcloak.runtime.errors import SessionError
from modelcloak.runtime.session import FheSession, LoadReport, SealedSession, SplitSession, load

__all__ = ["FheSession", "LoadReport", "SealedSession", "SessionError", "SplitSession", "load"]
