"""A session's licence from the owner backend: revalidated while it runs, its use reported.

`LicensedUse` joins the device side of the owner backend (modelcloak.licensing.client) to a session:
before each run it revalidates the licence when the backend's terms say it is due (within the
offline grace an unreachable backend is tolerated), and after each run it adds the batch's samples
to a running count that goes to the backend as signed, sequence-numbered usage batches every
`report_every` samples and when the session closes. The backend counts each batch exactly once
and refuses it over quota, which stops the session.

What this does not give, stated plainly: the reporter runs in this (host) process and holds the
usage key, so a device operator who controls the process can under-report; the backend sees the
batches it gets, in order, with no gaps. With a hardware TEE the enclave would do its own release
and reporting; the `process` enclave backend cannot keep the key from root (docs/OWNER.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelcloak.licensing.errors import OwnerError
from modelcloak.runtime.errors import SessionError

__all__ = ["LicensedUse"]


class LicensedUse:
    """Revalidation and usage reporting for a session whose key came from an `OwnerBackendKey`."""

    def __init__(self, key: Any, state_path: str | Path, *, report_every: int = 1000) -> None:
        if report_every < 1:
            raise SessionError("report_every must be at least 1")
        self.key = key
        self.state_path = Path(state_path)
        self.report_every = report_every
        self.pending = 0
        self._reporter: Any = None

    def start(self) -> None:
        """Call once the key was released (the usage key and terms exist); resends a crashed batch."""
        from modelcloak.licensing.client import OwnerClient, UsageReporter

        if self.key.usage_key is None:
            raise SessionError("the licence's usage key was not released; load the bundle with this key first")
        self._reporter = UsageReporter(
            OwnerClient(self.key.url),
            licence_id=self.key.licence_id,
            reporter_id=self.key.instance_id,
            usage_key=self.key.usage_key,
            state_path=self.state_path,
        )
        self._guard(self._reporter.flush)

    def before(self) -> None:
        self._guard(self.key.revalidate)

    def after(self, samples: int) -> None:
        self.pending += samples
        if self.pending >= self.report_every:
            self.flush()

    def flush(self) -> None:
        if self._reporter is None or not self.pending:
            return
        count, self.pending = self.pending, 0
        self._guard(lambda: self._reporter.report(count))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._reporter is not None:
                self._reporter.client.close()
                self._reporter = None

    @staticmethod
    def _guard(call: Any) -> Any:
        try:
            return call()
        except OwnerError as exc:
            raise SessionError(f"licence: {exc}") from None
