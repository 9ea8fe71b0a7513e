"""The runtime room's error type."""

from modelcloak.errors import ModelcloakError


class SessionError(ModelcloakError):
    """Loading or running a protected model on the device failed."""


class EnclaveError(SessionError):
    """The enclave process failed, timed out, broke the protocol or refused a request.

    `code` is the enclave's `ErrorCode` value when the enclave itself refused (e.g.
    BUDGET_EXHAUSTED, WRONG_KEY), else None (process died, timeout, malformed frame).
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
