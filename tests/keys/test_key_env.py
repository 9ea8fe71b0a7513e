"""--key-env: the key leaves the environment once read, so children (the enclave included) never
inherit it and /proc/PID/environ no longer shows it."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import os, subprocess, sys
    from modelcloak.keys import EnvKey
    value = os.environ["MC_TEST_KEY"]
    with open("/proc/self/environ", "rb") as f:
        before = value.encode() in f.read()
    provider = EnvKey("MC_TEST_KEY")
    a, b = provider.key_for({}), provider.key_for({})  # later reads come from the provider's own buffer
    first, second = bytes(a.view()), bytes(b.view())
    with open("/proc/self/environ", "rb") as f:
        after = value.encode() in f.read()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MC_TEST_KEY'))"],
                           capture_output=True, text=True).stdout.strip()
    print(before, after, "MC_TEST_KEY" in os.environ, child, first == second == bytes.fromhex(value))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/environ is Linux")
def test_key_env_is_removed_and_wiped_once_read():
    key = secrets.token_hex(32)
    env = {**os.environ, "MC_TEST_KEY": key}
    result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    before, after, still_set, child_sees, same_key = result.stdout.split()
    assert before == "True"  # negative control: the value was visible before the read
    assert after == "False" and still_set == "False" and child_sees == "None"
    assert same_key == "True"


def test_missing_variable_is_one_clear_error():
    from modelcloak.keys import EnvKey, KeyProviderError

    with pytest.raises(KeyProviderError, match="environment variable MC_TEST_UNSET_KEY is not set"):
        EnvKey("MC_TEST_UNSET_KEY").key_for({})
