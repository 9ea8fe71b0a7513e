"""Children that keep the resource limits the test process started with.

An in-process `modelcloak.load()` lowers the hard core-file limit of the test process for good
(hardening; raising it back needs CAP_SYS_RESOURCE). Under pytest-xdist a worker runs other files
before tests/runtime/test_hygiene.py, so a child it starts can no longer dump core. `start()`,
called when tests/conftest.py is imported (before any test), starts multiprocessing's fork server;
`run()` starts a command from there, with the limits of that moment.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import resource
import subprocess
from pathlib import Path

_CONTEXT = multiprocessing.get_context("forkserver")


def start() -> None:
    multiprocessing.forkserver.ensure_running()


def _run(argv: list[str], cwd: str, timeout: float) -> tuple[int, bytes, int]:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=timeout)
    return proc.returncode, proc.stderr, resource.getrlimit(resource.RLIMIT_CORE)[1]


def run(argv: list[str], cwd: Path, timeout: float) -> tuple[int, bytes, int]:
    """(return code, stderr, the hard core-file limit the command started with)."""
    with _CONTEXT.Pool(1) as pool:
        return pool.apply(_run, (argv, str(cwd), timeout))
