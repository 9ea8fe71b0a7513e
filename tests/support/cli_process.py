"""`modelcloak ...` in a child process, as a user runs it: real exit codes, real stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_modelcloak(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run the CLI with this interpreter; COLUMNS=200 so rich does not wrap what tests read."""
    return subprocess.run(
        [sys.executable, "-m", "modelcloak", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
