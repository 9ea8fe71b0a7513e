"""Each decrypted weight is wiped and handed back while onnxruntime builds, once it has its own copy
(modelcloak.runtime.copywatch, issue 15): the sealed load's peak no longer holds our buffer and the
runtime's copy at once. The peak itself is measured in benchmarks/bench_seal.py, not here."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading

import numpy as np
import onnxruntime as ort
import pytest
from models import make_mlp

from modelcloak import hygiene
from modelcloak.inference import load
from modelcloak.keys import generate_key_file
from modelcloak.protector import protect
from modelcloak.runtime.copywatch import RegionRelease

COPIED = b"2026-12-03 [I:onnxruntime:, graph.cc:1 InjectExternalInitializedTensors] Replaced external initializer: "
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_DONTNEED and /proc/self/smaps")


def _rss_of_mapping(address: int) -> int:
    """Rss in kB of the mapping that contains `address`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as handle:
        for line in handle:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("mapping not found")


def test_sealed_load_hands_back_every_weight_and_stays_exact(tmp_path):
    model = make_mlp((256, 512, 256, 10), seed=3)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    key = generate_key_file(tmp_path / "k.key")
    protect(model, tmp_path / "m.mcb", key=key)
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with load(tmp_path / "m.mcb", key=key) as session:
        released = session.report.weights_released_early
        got = session.run(x)
    # Whole pages only: each tensor may keep a partial page at either end (zeroed, not dropped).
    assert released >= weights - 2 * len(model.graph.initializer) * os.sysconf("SC_PAGE_SIZE")
    assert released <= weights
    assert np.array_equal(next(iter(got.values())), plain.run(None, {"x": x})[0])


def test_regions_are_released_only_when_reported_and_other_output_goes_through(capfd):
    buffer = hygiene.weights_buffer(6 * 4096)
    view = buffer.view()
    view[:] = b"\x5a" * len(view)
    view.release()
    # a and b share their last page: b's bytes must survive until b is reported too.
    regions = [("a", 0, 3 * 4096), ("b", 2 * 4096, 2 * 4096), ("never", 4 * 4096, 2 * 4096)]
    with RegionRelease(regions, buffer.release) as watch:
        os.write(2, COPIED + b"a\n")
        os.write(2, b"not a runtime line\n")
        shared_page = ctypes.string_at(buffer.address + 2 * 4096, 4096)  # a is copied, b is not yet
        os.write(2, COPIED + b"b\n")
        os.write(2, b"2026-12-03 [W:onnxruntime:, x.cc:1 f] a warning the session would have printed\n")
    contents = ctypes.string_at(buffer.address, 6 * 4096)
    buffer.close()
    assert watch.released == ["a", "b"]
    assert contents[: 4 * 4096] == bytes(4 * 4096)  # a and b wiped
    assert contents[4 * 4096 :] == b"\x5a" * (2 * 4096)  # never reported: untouched (the safe fallback)
    assert watch.released_bytes == 5 * 4096  # a's three pages, then b's two (one of them shared)
    assert shared_page == b"\x5a" * 4096  # a waited for b: the page they share was not wiped early
    err = capfd.readouterr().err
    assert "not a runtime line" in err and "onnxruntime" not in err


@linux_only
def test_released_pages_leave_rss_and_stay_out_after_the_final_wipe():
    size = 64 * 4096
    buffer = hygiene.weights_buffer(size)
    view = buffer.view()
    view[:] = b"\x33" * size
    view.release()
    before = _rss_of_mapping(buffer.address)
    assert buffer.release(0, size) == size
    after_release = _rss_of_mapping(buffer.address)
    buffer.wipe()  # close() wipes first: released pages must not be faulted back in
    after_wipe = _rss_of_mapping(buffer.address)
    assert ctypes.string_at(buffer.address, size) == bytes(size)
    buffer.close()
    assert before >= size // 1024
    assert after_release <= before - size // 1024
    assert after_wipe == after_release


def test_release_outside_the_buffer_is_refused():
    with hygiene.weights_buffer(4096) as buffer:
        with pytest.raises(hygiene.HygieneError, match="outside"):
            buffer.release(4000, 200)


def test_a_child_holding_the_pipe_does_not_block_the_end_of_the_build(capfd):
    # Another thread's child process started during the build inherits the pipe as its stderr.
    with hygiene.weights_buffer(4096) as buffer:
        with RegionRelease([("a", 0, 4096)], buffer.release) as watch:
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            os.write(2, COPIED + b"a\n")
        try:
            assert child.poll() is None  # the build ended while the child still held the pipe
            assert watch.released == ["a"]
        finally:
            child.kill()
            child.wait()
    os.write(2, b"stderr is back\n")
    assert "stderr is back" in capfd.readouterr().err


def test_a_failing_release_stops_early_release_but_keeps_draining(capfd):
    calls = []

    def release(offset: int, length: int) -> int:
        calls.append(offset)
        raise hygiene.HygieneError("buffer already closed")

    with RegionRelease([("a", 0, 4096), ("b", 4096, 4096)], release) as watch:
        for _ in range(2000):  # far more than a pipe holds: a reader that stopped would block here
            os.write(2, COPIED + b"a\n")
        os.write(2, COPIED + b"b\n")
        os.write(2, b"still forwarded\n")
    assert calls == [0] and watch.released == []
    assert "still forwarded" in capfd.readouterr().err


def test_concurrent_sealed_loads_each_hand_back_and_leave_stderr_working(tmp_path, capfd):
    key = generate_key_file(tmp_path / "k.key")
    models = [make_mlp((64, 128, 10), seed=seed) for seed in (1, 2)]
    for index, model in enumerate(models):
        protect(model, tmp_path / f"m{index}.mcb", key=key)
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    results: dict[int, tuple[int, np.ndarray]] = {}

    def open_and_run(index: int) -> None:
        with load(tmp_path / f"m{index}.mcb", key=key) as session:
            results[index] = (session.report.weights_released_early, next(iter(session.run(x).values())))

    threads = [threading.Thread(target=open_and_run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, model in enumerate(models):
        plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        released, got = results[index]
        assert released > 0
        assert np.array_equal(got, plain.run(None, {"x": x})[0])
    os.write(2, b"stderr after two loads\n")
    assert "stderr after two loads" in capfd.readouterr().err


def test_runtime_lines_at_the_level_the_caller_asked_for_still_show(capfd):
    with hygiene.weights_buffer(4096) as buffer:
        with RegionRelease([("a", 0, 4096)], buffer.release, show_from=2):
            os.write(2, COPIED + b"a\n")  # INFO: below the asked level, consumed
            os.write(2, b"2026-12-03 [W:onnxruntime:, x.cc:1 f] a warning the caller asked to see\n")
    err = capfd.readouterr().err
    assert "a warning the caller asked to see" in err and "Replaced external initializer" not in err


def test_regions_sharing_bytes_are_found_as_a_full_pairwise_check_finds_them():
    # The reader looks up which regions share bytes once, not against every pending tensor per
    # line (issue 19): the lookup must agree with the pairwise byte-overlap test it replaced.
    from modelcloak.runtime.copywatch import _sharing

    rng = np.random.default_rng(7)
    for _ in range(200):
        count = int(rng.integers(1, 12))
        starts = rng.integers(0, 40, count)
        regions = {f"t{i}": (int(s), int(s + rng.integers(0, 12))) for i, s in enumerate(starts)}
        found = {name: sorted(others) for name, others in _sharing(regions).items()}
        expected = {}
        for name, (start, end) in regions.items():
            others = sorted(o for o, (s, e) in regions.items() if o != name and start < e and s < end)
            if others:
                expected[name] = others
        assert found == expected
    assert _sharing({"a": (0, 10), "b": (10, 20), "c": (20, 20)}) == {}  # touching regions share nothing
    assert _sharing({"a": (0, 10), "b": (9, 20)}) == {"a": ["b"], "b": ["a"]}
