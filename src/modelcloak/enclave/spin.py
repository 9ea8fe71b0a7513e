"""Bounded adaptive spinning before a blocking wait on the enclave channel (docs/ENCLAVE.md, "Spinning").

A call to the enclave is two hand-overs: the host sends and waits for the reply, the enclave
answers and waits for the next request. Blocking in poll or read costs a sleep and a wake-up at
each (tens of microseconds on a virtual machine, more when the core went idle), which is most of an
empty round trip. When the other side answers within a short time, it is cheaper to ask again
without sleeping for a short while first. The wait is bounded (a few hundred microseconds of CPU at
most per wait), yields the core between tries so a busy machine's other work runs, and is
adaptive: after a wait that outlasted the bound (the other side was busy or idle), the next wait
blocks at once, so an idle peer costs one bounded spin and then nothing.

Both ends use it: the host (runtime.enclave_client) waiting for a reply and the enclave
(server.Channel) waiting for the next request. Imports nothing from the host side.
"""

from __future__ import annotations

import os
import select
import time

DEFAULT_SPIN_SECONDS = 200e-6
MAX_SPIN_SECONDS = 1.0  # what --spin-us accepts; only measurements use more than a millisecond


class Spinner:
    """When and how long to spin before blocking.

    `armed` says whether the next wait may spin; `waited(seconds)` records how long the last wait
    took from start to data (spun or blocked), and re-arms the spinner only if that was within the
    bound: an answer the bound would not have caught is not spun for next time.
    """

    __slots__ = ("limit", "armed")

    def __init__(self, limit: float = DEFAULT_SPIN_SECONDS) -> None:
        if not 0 <= limit <= MAX_SPIN_SECONDS:
            raise ValueError(f"spin bound must be 0..{MAX_SPIN_SECONDS} s, got {limit}")
        self.limit = limit
        self.armed = limit > 0

    def waited(self, seconds: float) -> None:
        self.armed = seconds <= self.limit and self.limit > 0


def spin_until_readable(poller: select.poll, spinner: Spinner, began: float) -> bool:
    """Poll without blocking until the descriptor registered in `poller` is readable (True) or
    `spinner.limit` has passed since `began` (False), yielding the core between tries."""
    end = began + spinner.limit
    poll = poller.poll
    now = time.perf_counter
    yield_core = os.sched_yield
    while True:
        if poll(0):
            return True
        if now() >= end:
            return False
        yield_core()
