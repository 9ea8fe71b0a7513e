"""Skip (or, with MODELCLOAK_REQUIRE_ALL=1, fail) a native enclave test when gcc, make or
libcrypto's headers are missing. Helper module, not a test file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def toolchain_missing() -> str | None:
    """What the native enclave's build lacks on this machine, or None."""
    if shutil.which("gcc") is None or shutil.which("make") is None:
        return "gcc and make are not installed"
    if not Path("/usr/include/openssl/evp.h").exists():
        return "libcrypto headers are not installed (libssl-dev)"
    return None


def require_toolchain() -> None:
    missing = toolchain_missing()
    if missing:
        if os.environ.get("MODELCLOAK_REQUIRE_ALL"):
            pytest.fail(f"the native enclave's tests need a C toolchain: {missing}")
        pytest.skip(f"the native enclave's tests need a C toolchain: {missing}")
