"""The audit trail of refused and malformed requests, written in batches off the request path.

Every refusal gets an audit entry, but anyone who can reach the port can cause refusals, so the
entries must not cost a synced commit each (that was one fsync per junk request, issue 12) nor grow
without bound. Entries go to a bounded queue; one thread writes what is waiting in one transaction
(at most `max_batch` rows, every `interval` seconds at the latest). When the queue is full, entries
are counted instead of kept, and the count is written as one `audit.dropped` entry with the next
batch, so the log says how much it is missing. `serve` writes what is still queued before it exits
on SIGTERM or Ctrl-C (`close`); entries queued when the process is killed (SIGKILL, power loss) are
lost. Granted releases and owner actions are audited in their own transaction, not here.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from modelcloak.owner.store import Store

_log = logging.getLogger("modelcloak.owner")
SHUTDOWN_FLUSH_TIMEOUT = 30.0  # seconds a stopping server waits for queued entries (a hung database)


class RefusalLog:
    def __init__(self, store: Store, *, capacity: int = 10_000, max_batch: int = 500, interval: float = 0.2) -> None:
        self.store = store
        self.max_batch = max_batch
        self.interval = interval
        self._queue: queue.Queue[tuple[str, str, dict[str, Any]] | threading.Event] = queue.Queue(capacity)
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def record(self, event: str, subject: str, **detail: Any) -> None:
        """Queue one refusal entry (never blocks; counted as dropped when the queue is full)."""
        self._ensure_writer()
        try:
            self._queue.put_nowait((event, subject[:256], detail))
        except queue.Full:
            with self._dropped_lock:
                self._dropped += 1

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything recorded so far is written (tests, shutdown); False if `timeout` passed first."""
        self._ensure_writer()
        marker = threading.Event()
        self._queue.put(marker)
        return marker.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """At shutdown: write what is queued, waiting at most `timeout` seconds (a database that hangs
        must not keep the process from exiting); says in the log when entries were left unwritten."""
        if self._thread is None:  # nothing was ever recorded
            return
        # Always through the queue: a batch the writer has taken but not yet committed is not in it.
        if not self.flush(timeout):
            _log.error("refusal audit entries still unwritten after %g s at shutdown: lost", timeout)

    def _ensure_writer(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._start_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="refusal-audit", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=self.interval if len(batch) == 1 else 0))
                except queue.Empty:
                    break
            markers = [item for item in batch if isinstance(item, threading.Event)]
            entries = [item for item in batch if not isinstance(item, threading.Event)]
            with self._dropped_lock:
                dropped, self._dropped = self._dropped, 0
            try:
                if entries or dropped:
                    with self.store.transaction() as session:
                        for event, subject, detail in entries:
                            self.store.audit(session, event, subject, "refused", **detail)
                        if dropped:
                            self.store.audit(session, "audit.dropped", "refusals", "refused", count=dropped)
            except Exception:  # the database is down: say so in the log, keep serving
                _log.error("could not write %d refusal audit entries", len(entries) + dropped, exc_info=True)
            for marker in markers:
                marker.set()
