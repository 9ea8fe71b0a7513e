"""A real software TPM (swtpm) for tests: `modelcloak.keys.swtpm`, plus the skip-or-fail rule.

`require_swtpm()` skips a test when swtpm or tpm2-pytss is missing, or fails it when
MODELCLOAK_REQUIRE_ALL is set (CI sets it: there a missing TPM stack is a broken setup, not a
reason to pass quietly).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from modelcloak.keys.swtpm import STARTUP_TIMEOUT, SwTpm, clear_tpm, extend_pcr

__all__ = ["STARTUP_TIMEOUT", "StartTpm", "SwTpm", "clear_tpm", "extend_pcr", "require_swtpm"]

StartTpm = Callable[[Path], SwTpm]


def require_swtpm() -> None:
    """Skip (or, under MODELCLOAK_REQUIRE_ALL, fail) unless swtpm and tpm2-pytss are usable."""
    problems = []
    if shutil.which("swtpm") is None:
        problems.append("swtpm is not installed (apt-get install swtpm swtpm-tools)")
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError as exc:
        problems.append(f"tpm2-pytss is not importable ({exc}); pip install tpm2-pytss (needs libtss2-dev)")
    if problems:
        message = "; ".join(problems)
        if os.environ.get("MODELCLOAK_REQUIRE_ALL"):
            pytest.fail(f"TPM tests need a software TPM: {message} (.ci/run installs both)")
        pytest.skip(message)
