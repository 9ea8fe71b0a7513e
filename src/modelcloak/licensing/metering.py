"""A session's licence from the owner backend: revalidated while it runs, its use reserved or reported.

`LicensedUse` joins the device side of the owner backend (modelcloak.licensing.client) to a session.
Before each run it revalidates the licence when the backend's terms say it is due (within the
offline grace an unreachable backend is tolerated). Then:

- a licence with a query quota is metered by *reservation*: before a run answers its samples, they
  are sent as a signed usage batch, and only an acknowledged batch lets the run go ahead; a batch
  the backend refuses (quota used up, licence revoked or expired) stops the session before anything
  is answered, so a quota of 10 answers at most 10;
- a licence without a quota is metered after the fact, in batches of `report_every` samples and
  when the session closes (fewer round trips; nothing to exceed).

While the backend cannot be reached and the licence's offline grace (`offline_until`) lasts, runs
go ahead and their counts wait in the usage state file (fsynced) for the first batch after the
backend is back; once the grace is over, the session stops. The backend counts each batch exactly
once and refuses new batches of a revoked or expired licence.

What this does not give, stated plainly: the reporter runs in this (host) process and holds the
usage key, so a device operator who controls the process can under-report; the backend sees the
batches it gets, in order, with no gaps. Queries run offline are not checked against the quota
until they are reported. With a hardware TEE the enclave would do its own release and reporting;
the `process` enclave backend cannot keep the key from root (docs/OWNER.md).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelcloak.licensing.errors import OwnerError
from modelcloak.licensing.protocol import RequestRefused
from modelcloak.runtime.errors import SessionError

__all__ = ["LicensedUse"]


class LicensedUse:
    """Revalidation and usage metering for a session whose key came from an `OwnerBackendKey`."""

    def __init__(
        self,
        key: Any,
        state_path: str | Path,
        *,
        report_every: int = 1000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if report_every < 1:
            raise SessionError("report_every must be at least 1")
        self.key = key
        self.state_path = Path(state_path)
        self.report_every = report_every
        self.clock = clock
        self.pending = 0
        self._reporter: Any = None

    @property
    def reserves(self) -> bool:
        """True when the licence has a quota: runs are paid for before they answer."""
        return self.key.terms.get("query_quota") is not None

    def start(self) -> None:
        """Call once the key was released (the usage key and terms exist); resends a crashed batch."""
        from modelcloak.licensing.client import UsageReporter

        if self.key.usage_key is None:
            raise SessionError("the licence's usage key was not released; load the bundle with this key first")
        self._reporter = UsageReporter(
            self.key.client(),
            licence_id=self.key.licence_id,
            reporter_id=self.key.instance_id,
            usage_key=self.key.usage_key,
            state_path=self.state_path,
        )
        self._send(self._reporter.flush)

    def before(self, samples: int = 0) -> None:
        """Revalidate when due; with a quota, reserve `samples` (raises SessionError if refused)."""
        self._guard(lambda: self.key.revalidate(self.clock()))
        if samples and self.reserves and self._reporter is not None:
            self._meter(samples)

    def after(self, samples: int) -> None:
        if self.reserves:
            return  # paid for in before()
        self.pending += samples
        if self.pending >= self.report_every:
            self.flush()

    def flush(self) -> None:
        if self._reporter is None or not self.pending:
            return
        count, self.pending = self.pending, 0
        self._meter(count)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._reporter is not None:
                self._reporter.client.close()
                self._reporter = None

    def _meter(self, samples: int) -> None:
        """Send `samples` as a batch; while the backend is unreachable (within the grace) they wait on disk."""
        if self._reporter.has_pending and not self._send(self._reporter.flush):
            self._reporter.defer(samples)  # the older batch could not be resent: these wait behind it
            return
        # If this one cannot be sent, it stays in the state file as the pending batch, counts included.
        self._send(lambda: self._reporter.report(samples))

    def _send(self, call: Callable[[], Any]) -> bool:
        """Run a usage call: True when done, False when the backend is unreachable within the offline grace."""
        try:
            call()
        except RequestRefused as exc:
            raise SessionError(f"licence: {exc}") from None
        except OwnerError as exc:
            offline_until = self._offline_until()
            if offline_until is None or self.clock() >= offline_until:
                until = offline_until.isoformat() if offline_until else "unknown"
                raise SessionError(
                    f"licence: usage could not be reported and the offline grace ended ({until}): {exc}"
                ) from None
            return False
        return True

    def _offline_until(self) -> datetime | None:
        try:
            return datetime.fromisoformat(self.key.terms["offline_until"])
        except (KeyError, TypeError, ValueError):
            return None

    @staticmethod
    def _guard(call: Any) -> Any:
        try:
            return call()
        except OwnerError as exc:
            raise SessionError(f"licence: {exc}") from None
