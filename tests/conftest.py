"""Shared fixtures: small real ONNX models built with onnx.helper, and keys."""

from __future__ import annotations

from pathlib import Path

import onnx
import pristine
import pytest
from models import make_mlp

from modelcloak import hygiene
from modelcloak.keys import KeyFile, generate_key_file


@pytest.fixture
def mlp() -> onnx.ModelProto:
    return make_mlp()


@pytest.fixture
def key_file(tmp_path: Path) -> KeyFile:
    return generate_key_file(tmp_path / "model.key")


@pytest.fixture
def other_key_file(tmp_path: Path) -> KeyFile:
    return generate_key_file(tmp_path / "other.key")


@pytest.fixture(autouse=True)
def _budget_state_in_tmp(tmp_path_factory, monkeypatch):
    """Split bundles with a query budget keep its sealed count under $XDG_STATE_HOME by default;
    tests keep theirs in a temporary directory, never in the user's home."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-state"))


_CORE_LIMIT_AT_START = __import__("resource").getrlimit(__import__("resource").RLIMIT_CORE)
pristine.start()  # before any test can harden this process (tests/support/pristine.py)


@pytest.fixture(autouse=True)
def _restore_process_hardening():
    """`modelcloak.load()` hardens the whole process (non-dumpable, no core files). Tests (and
    module fixtures) that load in-process would otherwise leave the pytest process hardened for
    every later test, so put back the state the session started with."""
    import ctypes
    import resource

    core_limit = _CORE_LIMIT_AT_START
    yield
    libc = ctypes.CDLL(None, use_errno=True)
    hygiene.stop_wiping_freed_heap()
    if libc.prctl(3, 0, 0, 0, 0) == 0:  # PR_GET_DUMPABLE
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
    if resource.getrlimit(resource.RLIMIT_CORE) != core_limit:
        try:
            resource.setrlimit(resource.RLIMIT_CORE, core_limit)
        except (ValueError, OSError):
            pass  # raising a hard limit needs root; the tests that care skip with a reason


def pytest_collection_modifyitems(items: list) -> None:
    """Run the memory-hygiene tests first: they need a process whose hard core-file limit was never
    lowered, and an in-process `load()` lowers it irreversibly without CAP_SYS_RESOURCE."""
    items.sort(key=lambda item: 0 if item.path.name == "test_hygiene.py" else 1)


# --- software TPMs (tests/support/swtpm.py) ----------------------------------------------------------------


@pytest.fixture
def start_tpm(tmp_path):
    """Start swtpm instances on demand (one per state dir); all are stopped after the test."""
    import swtpm

    swtpm.require_swtpm()
    running = []

    def start(state_dir):
        instance = swtpm.SwTpm(state_dir).start()
        running.append(instance)
        return instance

    yield start
    for instance in running:
        instance.stop()


@pytest.fixture
def tpm(start_tpm, tmp_path):
    return start_tpm(tmp_path / "tpm-a")


# --- where the suite's time goes (CONTRIBUTING.md, "Suite times") -----------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With MODELCLOAK_TEST_TIMES=FILE, append each test's wall and CPU seconds (its own process
    plus the children it waited for) to FILE. CPU time says what a test costs on a shared machine,
    where wall time mostly says how busy the machine was."""
    import os
    import resource
    import time

    record = os.environ.get("MODELCLOAK_TEST_TIMES")
    if not record:
        yield
        return

    def cpu() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    wall, spent = time.perf_counter(), cpu()
    yield
    wall, spent = time.perf_counter() - wall, cpu() - spent
    slow = "slow" if item.get_closest_marker("slow") else "fast"
    with open(record, "a") as log:
        log.write(f"{spent:.2f}\t{wall:.2f}\t{slow}\t{item.nodeid}\n")
