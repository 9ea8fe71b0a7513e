"""The enclave runtime, its protocol, output policy and sandbox: real processes, no mocks.

A small private part (two dense layers, logits out) is sealed with `write_bundle` as an
`"enclave"` section next to a host section; enclaves are started with their own key and driven
through `EnclaveClient`, or over the raw socket where the point is to send what the client never
would. Every security check has a negative control next to it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelcloak.bundle.container import Bundle, SectionSource, write_bundle
from modelcloak.enclave import chunks, protocol
from modelcloak.enclave.gramine import render_manifest
from modelcloak.enclave.policy import (
    BudgetExhausted,
    Meter,
    OutputPolicy,
    PolicyError,
    RateLimited,
    apply_output_policy,
    parse_policy,
)
from modelcloak.enclave.protocol import ErrorCode, MsgType
from modelcloak.runtime.enclave_client import EnclaveClient, EnclaveError

SRC = Path(__file__).resolve().parents[2] / "src"
ENCLAVE_DIR = SRC / "modelcloak" / "enclave"
MODEL_KEY = bytes(range(32))
ENCLAVE_KEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(200, 232))
IN, CLASSES = 16, 10


# --------------------------------------------------------------------------------------------
# Fixtures: a private part, bundles sealed for the enclave, key files


def private_part(seed: int = 7) -> onnx.ModelProto:
    """h[batch, 16] -> Gemm 256 -> Relu -> Gemm 10 -> logits (no softmax): ~27 KB, several 4 KiB chunks."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((IN, 256)) / 4).astype(np.float32)
    b1 = (rng.standard_normal(256) / 10).astype(np.float32)
    w2 = (rng.standard_normal((256, CLASSES)) / 16).astype(np.float32)
    b2 = (rng.standard_normal(CLASSES) / 10).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["h", "w1", "b1"], ["z"]),
            helper.make_node("Relu", ["z"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"]),
        ],
        "private",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return private_part()


@pytest.fixture(scope="module")
def reference(model: onnx.ModelProto):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"h": x})[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("enclave")


def _key_file(path: Path, key: bytes) -> Path:
    path.write_text(key.hex() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def key_file(workdir: Path) -> Path:
    return _key_file(workdir / "enclave.key", ENCLAVE_KEY)


@pytest.fixture(scope="module")
def other_key_file(workdir: Path) -> Path:
    return _key_file(workdir / "other.key", OTHER_KEY)


@pytest.fixture(scope="module")
def seal(workdir: Path, model: onnx.ModelProto):
    """seal(policy) -> (header, enclave section ciphertext) of a fresh split bundle."""
    private = model.SerializeToString()
    public = b"public graph bytes: only the host key opens these"
    counter = iter(range(10**6))

    def make(policy: dict | None) -> tuple[bytes, bytes]:
        path = workdir / f"bundle-{next(counter)}.mcb"
        write_bundle(
            path,
            master_key=MODEL_KEY,
            key_spec={"provider": "keyfile", "kdf": None},
            scheme="split",
            sections=[
                SectionSource("public.graph", len(public), lambda: [public]),
                SectionSource("private", len(private), lambda: [private], key="enclave"),
            ],
            extra={
                "policy": policy if policy is not None else {},
                "created": {"at": "2025-01-01T00:00:00+00:00", "tool": "tests"},
            },
            enclave_key=ENCLAVE_KEY,
            enclave_key_spec={"provider": "keyfile"},
            chunk_size=4096,
        )
        with Bundle.open(path) as bundle:
            return bundle.header, bundle.section_ciphertext("private")

    return make


@contextmanager
def enclave(key_args: list[str], sealed: tuple[bytes, bytes] | None = None, **kwargs) -> Iterator[EnclaveClient]:
    threads = kwargs.pop("threads", 1)
    client = EnclaveClient(**kwargs)
    try:
        client.start(key_args, threads=threads)
        if sealed is not None:
            client.load(*sealed)
        yield client
    finally:
        client.close()


def samples(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN)).astype(np.float32)


@pytest.fixture(scope="module")
def scores_enclave(key_file: Path, seal) -> Iterator[EnclaveClient]:
    with enclave(["--key-file", str(key_file)], seal({"output": "scores"}), threads=2) as client:
        yield client


# --------------------------------------------------------------------------------------------
# Outputs under each policy, against onnxruntime on the same model


def test_scores_policy_returns_raw_outputs(scores_enclave: EnclaveClient, reference) -> None:
    info = scores_enclave.info
    assert info.input_names == ["h"] and info.output_names == ["logits"]
    assert info.policy == OutputPolicy("scores")
    x = samples(1, 7)
    out = scores_enclave.infer({"h": x})
    assert list(out) == ["logits"] and out["logits"].dtype == np.float32
    np.testing.assert_allclose(out["logits"], reference(x), rtol=0, atol=1e-5)


def test_label_policy_returns_argmax_only(key_file: Path, seal, reference) -> None:
    with enclave(["--key-file", str(key_file)], seal(None)) as client:  # no policy: label is the default
        info = client.info
        assert info.policy == OutputPolicy("label")
        assert [(s.name, s.dtype, s.shape) for s in info.outputs] == [("label", np.dtype("int64"), (None,))]
        x = samples(2, 33)
        out = client.infer({"h": x})
        assert list(out) == ["label"] and out["label"].dtype == np.int64 and out["label"].shape == (33,)
        np.testing.assert_array_equal(out["label"], np.argmax(reference(x), axis=-1))
        # float64 inputs are cast on the host (same kind); the enclave itself insists on float32.
        np.testing.assert_array_equal(client.infer({"h": x.astype(np.float64)})["label"], out["label"])
        pid = client.pid
    assert client.returncode == 0, "SHUTDOWN must end the enclave with exit code 0"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_topk_policy_returns_indices_without_scores(key_file: Path, seal, reference) -> None:
    env = {**os.environ, "MC_TEST_ENCLAVE_KEY": ENCLAVE_KEY.hex()}  # also covers --key-env
    with enclave(["--key-env", "MC_TEST_ENCLAVE_KEY"], seal({"output": "topk:3"}), env=env) as client:
        assert client.info.policy == OutputPolicy("topk", 3)
        assert [(s.name, s.shape) for s in client.info.outputs] == [("topk", (None, 3))]
        x = samples(3, 9)
        out = client.infer({"h": x})
        assert list(out) == ["topk"] and out["topk"].dtype == np.int64 and out["topk"].shape == (9, 3)
        expected = np.argsort(-reference(x), axis=-1, kind="stable")[:, :3]
        np.testing.assert_array_equal(out["topk"], expected)


# --------------------------------------------------------------------------------------------
# Keys and authentication of the header (policy included)


def test_wrong_enclave_key_is_named(other_key_file: Path, seal) -> None:
    with enclave(["--key-file", str(other_key_file)]) as client:
        with pytest.raises(EnclaveError) as caught:
            client.load(*seal(None))
        message = str(caught.value)
        assert message.startswith("wrong enclave key: ") and client.key_id in message
        assert caught.value.code == ErrorCode.WRONG_KEY
        assert "\n" not in message


def test_key_file_readable_by_others_is_refused(workdir: Path) -> None:
    loose = _key_file(workdir / "loose.key", ENCLAVE_KEY)
    loose.chmod(0o644)
    client = EnclaveClient()
    with pytest.raises(EnclaveError, match="readable by other users"):
        client.start(["--key-file", str(loose)])
    assert client.returncode == 2


def _edit_manifest(header: bytes, old: bytes, new: bytes) -> bytes:
    """Replace bytes in the manifest and fix the length prefix, so the header still parses."""
    manifest = header[14:]
    assert old in manifest
    edited = manifest.replace(old, new, 1)
    return header[:10] + struct.pack(">I", len(edited)) + edited


def test_header_edited_by_the_host_is_refused(key_file: Path, seal) -> None:
    header, ciphertext = seal({"output": "label", "query_budget": 5})
    to_scores = _edit_manifest(header, b'"output":"label"', b'"output":"scores"')
    more_budget = _edit_manifest(header, b'"query_budget":5', b'"query_budget":9')
    assert json.loads(to_scores[14:])["policy"]["output"] == "scores"  # the edit is real and parses
    flipped = bytearray(header)
    flipped[header.index(b'"at":"') + 8] ^= 0x01  # one digit of the creation date: still valid JSON
    cut = ciphertext[:-1]
    tampered = bytearray(ciphertext)
    tampered[len(ciphertext) // 2] ^= 0x80
    with enclave(["--key-file", str(key_file)]) as client:
        for bad_header, bad_ciphertext in (
            (to_scores, ciphertext),
            (more_budget, ciphertext),
            (bytes(flipped), ciphertext),
        ):
            with pytest.raises(EnclaveError, match="failed authentication") as caught:
                client.load(bad_header, bad_ciphertext)
            assert caught.value.code == ErrorCode.AUTH_FAILED
        with pytest.raises(EnclaveError, match="failed authentication"):
            client.load(header, bytes(tampered))
        with pytest.raises(EnclaveError, match="ciphertext bytes") as caught:
            client.load(header, cut)
        assert caught.value.code == ErrorCode.BAD_HEADER
        # Negative control: the same process loads the untouched header, with its own policy.
        info = client.load(header, ciphertext)
        assert info.policy == OutputPolicy("label", query_budget=5)


# --------------------------------------------------------------------------------------------
# Budget and rate limit


def test_query_budget_is_exact(key_file: Path, seal) -> None:
    with enclave(["--key-file", str(key_file)], seal({"output": "label", "query_budget": 10})) as client:
        client.infer({"h": samples(4, 5)})
        with pytest.raises(EnclaveError, match=r"too small for this batch \(6 samples asked, 5 of 10 left\)"):
            client.infer({"h": samples(5, 6)})
        client.infer({"h": samples(6, 5)})
        with pytest.raises(EnclaveError) as caught:
            client.infer({"h": samples(7, 1)})
        assert str(caught.value) == "enclave refused: query budget exhausted (10 of 10 samples used)"
        assert caught.value.code == ErrorCode.BUDGET_EXHAUSTED
        stats = client.stats()
        assert (stats.samples_served, stats.requests_served, stats.requests_refused) == (10, 2, 2)
        assert (stats.query_budget, stats.budget_left) == (10, 0)


def test_rate_limit_is_a_token_bucket(key_file: Path, seal) -> None:
    with enclave(["--key-file", str(key_file)], seal({"rate_limit_per_s": 1.0})) as client:
        client.infer({"h": samples(8, 1)})
        with pytest.raises(EnclaveError, match="rate limit of 1 samples/s reached") as caught:
            client.infer({"h": samples(9, 1)})
        assert caught.value.code == ErrorCode.RATE_LIMITED
        with pytest.raises(EnclaveError, match="exceeds the rate limit's burst"):
            client.infer({"h": samples(10, 2)})
        time.sleep(1.05)
        client.infer({"h": samples(11, 1)})
        assert client.stats().requests_refused == 2


# --------------------------------------------------------------------------------------------
# Malformed frames over the raw socket: an ERROR reply each time, and the enclave keeps serving


class RawEnclave:
    """An enclave process driven frame by frame, without the client's checks."""

    def __init__(self, key_file: Path, *extra: str) -> None:
        parent, child = socket.socketpair()
        argv = [sys.executable, "-m", "modelcloak.enclave", "--fd", str(child.fileno()), "--key-file", str(key_file)]
        self.proc = subprocess.Popen(
            [*argv, *extra], pass_fds=(child.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        child.close()
        self.sock = parent
        self.sock.settimeout(15)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, msg_type: int, request_id: int, payload: bytes = b"") -> None:
        self.send(protocol.encode_frame(msg_type, request_id, payload))

    def _exact(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            part = self.sock.recv(count - len(data))
            assert part, "enclave closed the connection"
            data += part
        return data

    def recv(self) -> tuple[int, int, bytes]:
        length, msg_type, request_id = protocol.decode_header(self._exact(13))
        return msg_type, request_id, self._exact(length - 9)

    def expect_error(self, request_id: int, code: ErrorCode) -> str:
        msg_type, rid, payload = self.recv()
        assert (msg_type, rid) == (MsgType.ERROR, request_id), (msg_type, rid, payload)
        got, message = protocol.decode_error(payload)
        assert got == code, (ErrorCode(got), message)
        return message

    def infer(self, request_id: int, x: np.ndarray) -> np.ndarray:
        self.frame(MsgType.INFER, request_id, protocol.encode_tensors([("h", x)]))
        msg_type, rid, payload = self.recv()
        assert (msg_type, rid) == (MsgType.RESULT, request_id), (msg_type, payload)
        return dict(protocol.decode_tensors(payload))["logits"]

    def damaged_infers(self, good: bytes, request_ids: range) -> None:
        """Random damage to a valid INFER payload: every frame gets an answer, none kills the enclave."""
        rng = np.random.default_rng(0)
        for request_id in request_ids:
            damaged = bytearray(good)
            for position in rng.integers(0, len(damaged), size=rng.integers(1, 4)):
                damaged[position] = rng.integers(0, 256)
            damaged = damaged[: rng.integers(0, len(damaged) + 1)] if rng.random() < 0.3 else damaged
            self.frame(MsgType.INFER, request_id, bytes(damaged))
            msg_type, rid, _ = self.recv()
            assert rid == request_id and msg_type in (MsgType.RESULT, MsgType.ERROR)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.sock.close()
        self.proc.stderr.close()

    def load(self, request_id: int, header: bytes, ciphertext: bytes, piece: int = 1000) -> None:
        self.frame(MsgType.LOAD, request_id, protocol.encode_load(header, len(ciphertext)))
        for start in range(0, len(ciphertext), piece):  # pieces that do not line up with chunks
            self.frame(MsgType.LOAD_DATA, request_id, ciphertext[start : start + piece])


def test_malformed_frames_get_errors_and_the_enclave_keeps_serving(key_file: Path, seal, reference) -> None:
    header, ciphertext = seal({"output": "scores"})
    raw = RawEnclave(key_file, "--max-frame-bytes", "65536")
    try:
        assert raw.recv()[0] == MsgType.HELLO
        x = samples(12, 3)
        good = protocol.encode_tensors([("h", x)])
        raw.frame(MsgType.INFER, 1, good)
        raw.expect_error(1, ErrorCode.BAD_STATE)  # before LOAD
        raw.frame(MsgType.LOAD_DATA, 2, b"stray")
        raw.expect_error(2, ErrorCode.BAD_STATE)
        # A LOAD cut short by another message: the LOAD fails, the PING is still answered.
        raw.frame(MsgType.LOAD, 3, protocol.encode_load(header, len(ciphertext)))
        raw.frame(MsgType.LOAD_DATA, 3, ciphertext[:100])
        raw.frame(MsgType.PING, 4, b"still there?")
        assert "interrupted" in raw.expect_error(3, ErrorCode.BAD_STATE)
        assert raw.recv() == (MsgType.PONG, 4, b"still there?")
        raw.load(5, header, ciphertext)
        assert raw.recv()[:2] == (MsgType.READY, 5)
        np.testing.assert_allclose(raw.infer(6, x), reference(x), atol=1e-5)

        def still_serving(request_id: int) -> None:
            np.testing.assert_allclose(raw.infer(request_id, x), reference(x), atol=1e-5)

        raw.frame(0x42, 7, b"what is this")  # unknown type
        raw.expect_error(7, ErrorCode.UNKNOWN_TYPE)
        still_serving(8)
        raw.send(struct.pack(">I", 3) + b"abc")  # shorter than type + request id
        raw.expect_error(0, ErrorCode.MALFORMED_FRAME)
        still_serving(9)
        raw.send(protocol.FRAME_HEADER.pack(65537, MsgType.INFER, 10))  # over the 64 KiB limit
        raw.expect_error(10, ErrorCode.FRAME_TOO_LARGE)  # answered before the body arrives
        raw.send(bytes(65537 - 9))
        still_serving(11)
        raw.frame(MsgType.INFER, 12, good[:-5])  # truncated tensor data
        assert "needs" in raw.expect_error(12, ErrorCode.BAD_TENSOR)
        raw.frame(MsgType.INFER, 13, good + b"\x00")  # trailing garbage
        raw.expect_error(13, ErrorCode.BAD_TENSOR)
        bad_dtype = bytearray(good)
        bad_dtype[2 + 2 + 1] = 99  # count, name length, "h", dtype code
        raw.frame(MsgType.INFER, 14, bytes(bad_dtype))
        assert "dtype code 99" in raw.expect_error(14, ErrorCode.BAD_TENSOR)
        raw.frame(MsgType.INFER, 15, protocol.encode_tensors([("h", x.astype(np.float64))]))
        raw.expect_error(15, ErrorCode.BAD_INPUT)
        raw.frame(MsgType.INFER, 16, protocol.encode_tensors([("h", np.zeros((2, 5), np.float32))]))
        assert "shape [?, 16]" in raw.expect_error(16, ErrorCode.BAD_INPUT)
        raw.frame(MsgType.INFER, 17, protocol.encode_tensors([("h", x), ("extra", x)]))
        assert "unknown 'extra'" in raw.expect_error(17, ErrorCode.BAD_INPUT)
        raw.frame(MsgType.LOAD, 18, b"\x00\x00")  # LOAD payload that does not parse
        raw.expect_error(18, ErrorCode.MALFORMED_FRAME)
        raw.load(19, header, ciphertext)  # a second LOAD: refused, its data drained
        raw.expect_error(19, ErrorCode.BAD_STATE)
        still_serving(20)
        raw.damaged_infers(good, range(100, 400))
        still_serving(500)
        raw.frame(MsgType.SHUTDOWN, 501)
        assert raw.recv()[:2] == (MsgType.BYE, 501)
        assert raw.proc.wait(timeout=10) == 0
    finally:
        raw.close()


# --------------------------------------------------------------------------------------------
# Death, hangs and recovery


def test_enclave_killed_mid_request_is_reported_and_restart_recovers(key_file: Path, seal, reference) -> None:
    """With automatic restarts off (max_restarts=0), a death is reported and restart() recovers."""
    with enclave(["--key-file", str(key_file)], seal({"output": "scores"}), max_restarts=0) as client:
        first_pid = client.pid
        os.kill(first_pid, signal.SIGSTOP)  # the request below is certainly in flight when the kill lands
        outcome: dict[str, object] = {}

        def ask() -> None:
            began = time.monotonic()
            try:
                client.infer({"h": samples(13, 2)}, timeout=10.0)
            except EnclaveError as exc:
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - began

        worker = threading.Thread(target=ask)
        worker.start()
        time.sleep(0.3)
        os.kill(first_pid, signal.SIGKILL)
        worker.join(timeout=10)
        assert str(outcome["error"]) == "enclave process died (exit code -9) while serving a request"
        assert outcome["seconds"] < 3.0  # reported at once, not at the 10 s timeout
        with pytest.raises(EnclaveError, match=r"died \(exit code -9\); call restart\(\)"):
            client.infer({"h": samples(13, 2)})
        info = client.restart()
        assert info is not None and info.policy.output == "scores" and client.pid != first_pid
        x = samples(14, 4)
        np.testing.assert_allclose(client.infer({"h": x})["logits"], reference(x), atol=1e-5)


def test_enclave_killed_mid_request_restarts_by_itself(key_file: Path, seal, reference) -> None:
    """Default client: the call in flight when the enclave dies is answered by a fresh enclave."""
    with enclave(["--key-file", str(key_file)], seal({"output": "scores"})) as client:
        first_pid = client.pid
        os.kill(first_pid, signal.SIGSTOP)
        outcome: dict[str, object] = {}
        x = samples(13, 2)

        def ask() -> None:
            try:
                outcome["result"] = client.infer({"h": x}, timeout=30.0)
            except EnclaveError as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=ask)
        worker.start()
        time.sleep(0.3)
        os.kill(first_pid, signal.SIGKILL)
        worker.join(timeout=60)
        assert "error" not in outcome, outcome.get("error")
        np.testing.assert_allclose(outcome["result"]["logits"], reference(x), atol=1e-5)
        assert client.pid != first_pid


def test_hung_enclave_times_out_then_recovers(key_file: Path, seal, reference) -> None:
    with enclave(["--key-file", str(key_file)], seal({"output": "scores"})) as client:
        os.kill(client.pid, signal.SIGSTOP)
        began = time.monotonic()
        with pytest.raises(EnclaveError) as caught:
            client.infer({"h": samples(15, 1)}, timeout=2.0)
        elapsed = time.monotonic() - began
        assert str(caught.value) == "enclave did not answer within 2.0 s (the process is stopped)"
        assert 2.0 <= elapsed < 2.5
        os.kill(client.pid, signal.SIGCONT)  # the late answer to the timed-out request is dropped
        x = samples(16, 3)
        np.testing.assert_allclose(client.infer({"h": x})["logits"], reference(x), atol=1e-5)


@pytest.mark.parametrize("restarts", [2, 0])
@pytest.mark.parametrize(
    "junk",
    [
        protocol.FRAME_HEADER.pack(0x7FFF_FFF0, MsgType.INFER, 77),  # a header claiming 2 GiB
        struct.pack(">I", 3) + b"abc",  # shorter than its own header
        protocol.encode_frame(0x42, 78, b"?"),  # a type no host sends
    ],
    ids=["2GiB", "short", "unknown-type"],
)
def test_junk_on_the_channel_is_recovered_from(key_file: Path, seal, reference, junk: bytes, restarts: int) -> None:
    """Bytes this host never sends put the stream out of step; the client notices the enclave's
    report, kills it and (restarts=2) answers from a fresh enclave. Control (restarts=0): the same
    junk does break the connection, reported as lost framing instead of waiting out the timeout."""
    with enclave(["--key-file", str(key_file)], seal({"output": "scores"}), max_restarts=restarts) as client:
        first_pid = client.pid
        client._conn._wsock.sendall(junk)  # as if a bug or another writer had sent it
        x = samples(21, 3)
        if restarts:
            np.testing.assert_allclose(client.infer({"h": x}, timeout=30)["logits"], reference(x), atol=1e-5)
            assert client.pid != first_pid
        else:
            with pytest.raises(EnclaveError, match="lost its framing") as caught:
                client.infer({"h": x}, timeout=30)
            assert "did not answer" not in str(caught.value)


def test_callers_during_a_restart_wait_for_it(key_file: Path, seal, reference) -> None:
    """Threads querying while another thread restarts the enclave get answers, not 'call start()'."""
    with enclave(["--key-file", str(key_file)], seal({"output": "scores"})) as client:
        failures: list[str] = []
        stop = threading.Event()

        def worker(thread: int) -> None:
            i = 0
            while not stop.is_set():
                x = samples(5000 + 100 * thread + i, 2)
                try:
                    got = client.infer({"h": x}, timeout=30)["logits"]
                except EnclaveError as exc:
                    failures.append(str(exc))
                    return
                if not np.allclose(got, reference(x), atol=1e-5):
                    failures.append(f"thread {thread}: wrong answer")
                i += 1

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for _ in range(2):
            time.sleep(0.2)
            client.restart()
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert failures == []


def test_session_timeout_bounds_run(tmp_path: Path) -> None:
    """load(..., enclave_timeout=2) bounds run(): a stopped enclave is reported at 2 s, not 10."""
    from conftest import make_mlp

    from modelcloak.inference import load
    from modelcloak.keys import generate_key_file
    from modelcloak.protector import protect

    host_key, enclave_key = generate_key_file(tmp_path / "h.key"), generate_key_file(tmp_path / "e.key")
    protect(make_mlp(), tmp_path / "m.mcb", key=host_key, scheme="split", cut={"last": 1}, enclave_key=enclave_key)
    with load(tmp_path / "m.mcb", key=host_key, enclave_key_file=enclave_key.path, enclave_timeout=2) as session:
        x = np.zeros((1, 16), np.float32)
        session.run(x)
        os.kill(session.enclave.pid, signal.SIGSTOP)
        try:
            with pytest.raises(EnclaveError, match=r"^enclave did not answer within 2.0 s \(the process is stopped\)$"):
                session.run(x)
        finally:
            os.kill(session.enclave.pid, signal.SIGCONT)


def test_host_refuses_feeds_that_do_not_name_the_enclave_inputs(scores_enclave: EnclaveClient, reference) -> None:
    """The per-call feed check (one pass over READY's inputs) refuses what the general check did:
    a missing name, an extra name, a renamed input (same count), integers for a float input.
    Control: the right name runs, as does a list or a float64 array (cast, same kind)."""
    x = samples(5, 3)
    served = scores_enclave.stats().requests_served
    for feeds, words in [
        ({}, "missing 'h'"),
        ({"h": x, "extra": x}, "unknown 'extra'"),
        ({"hh": x}, "missing 'h'; unknown 'hh'"),
        ({"h": x.astype(np.int64)}, "input 'h' must be float32, got int64"),
    ]:
        with pytest.raises(EnclaveError, match=re.escape(words)):
            scores_enclave.infer(feeds)
    assert scores_enclave.stats().requests_served == served  # refused here, nothing was sent
    expected = reference(x)
    for value in (x, x.tolist(), x.astype(np.float64)):
        np.testing.assert_allclose(scores_enclave.infer({"h": value})["logits"], expected, rtol=0, atol=1e-5)


def test_several_threads_each_get_their_own_answer(scores_enclave: EnclaveClient, reference) -> None:
    before = scores_enclave.stats().requests_served
    failures: list[str] = []

    def worker(thread: int) -> None:
        for i in range(20):
            x = samples(1000 * thread + i, 1 + (thread + i) % 4)
            got = scores_enclave.infer({"h": x})["logits"]
            if got.shape != (len(x), CLASSES) or not np.allclose(got, reference(x), atol=1e-5):
                failures.append(f"thread {thread} request {i}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures
    assert scores_enclave.stats().requests_served - before == 160


FAKE_ENCLAVE = textwrap.dedent(
    """
    import os, struct, sys
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    mode = os.environ["FAKE_MODE"]
    hello = struct.pack(">HI8sd", 1, 1 << 20, bytes(8), 0.0)
    os.write(fd, struct.pack(">IBQ", 9 + len(hello), 0x81, 0) + hello)
    while True:
        head = os.read(fd, 13)
        if len(head) < 13:
            break
        length, kind, rid = struct.unpack(">IBQ", head)
        left = length - 9
        while left:
            left -= len(os.read(fd, left))
        if mode == "garbage":
            os.write(fd, struct.pack(">IBQ", 9, 0x42, rid))
        elif mode == "huge":
            os.write(fd, struct.pack(">IBQ", 0xFFFFFFF0, 0x83, rid))
        elif mode == "crash":
            sys.stderr.write("simulated fault\\n")
            os._exit(7)
    """
)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("garbage", "enclave sent a malformed frame: unknown message type 0x42"),
        ("huge", "enclave sent a malformed frame: length 4294967280 outside 9..1048576"),
        ("crash", "enclave process died (exit code 7); it said: simulated fault while serving a request"),
    ],
)
def test_enclave_sending_garbage_or_crashing_is_a_clear_error(workdir: Path, mode: str, message: str) -> None:
    script = workdir / "fake_enclave.py"
    script.write_text(FAKE_ENCLAVE)
    client = EnclaveClient(
        command=[sys.executable, str(script)], max_frame_bytes=1 << 20, env={**os.environ, "FAKE_MODE": mode}
    )
    try:
        client.start(["--key-file", "unused"])
        began = time.monotonic()
        with pytest.raises(EnclaveError) as caught:
            client.stats(timeout=5.0)
        assert str(caught.value) == message
        assert time.monotonic() - began < 3.0
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# Sandbox


SANDBOX_PROBE = textwrap.dedent(
    """
    import errno, json, os, socket, subprocess, sys, threading
    from modelcloak.enclave import sandbox

    def attempt(fn):
        try:
            fn()
            return "ok"
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))

    # A thread that exists before the filter (like onnxruntime's pool) and acts after it.
    ready, go, late = threading.Event(), threading.Event(), {}
    def earlier_thread():
        ready.set()
        go.wait()
        late["open"] = attempt(lambda: open(sys.executable, "rb").close())
    early = threading.Thread(target=earlier_thread)
    early.start()
    ready.wait()
    if os.environ["PROBE_FILTER"] == "1":
        sandbox.install_filter()
    go.set()
    early.join()

    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    box = []
    worker = threading.Thread(target=lambda: box.append(sum(range(1000))))
    worker.start()
    worker.join()
    results = {
        "mode": sandbox.seccomp_mode(),
        "open_read": attempt(lambda: open(sys.executable, "rb").close()),
        "open_write": attempt(lambda: open(os.environ["PROBE_FILE"], "wb").close()),
        "open_from_earlier_thread": late["open"],
        "tcp_socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
        "unix_socket": attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()),
        "fork": attempt(fork),
        "signal_other_process": attempt(lambda: os.kill(os.getppid(), 0)),
        "signal_self": attempt(lambda: os.kill(os.getpid(), 0)),
        "subprocess": attempt(lambda: subprocess.run(["/bin/true"], check=False)),
        "new_thread": "ok" if box == [499500] else "failed",
    }
    sys.stdout.write(json.dumps(results) + "\\n")
    sys.stdout.flush()
    os.execv("/bin/true", ["/bin/true"])
    """
)


def _probe(workdir: Path, with_filter: bool) -> tuple[int, dict[str, object]]:
    env = {**os.environ, "PROBE_FILTER": "1" if with_filter else "0", "PROBE_FILE": str(workdir / "probe-written")}
    done = subprocess.run([sys.executable, "-c", SANDBOX_PROBE], env=env, capture_output=True, timeout=600)
    lines = done.stdout.decode().splitlines()
    assert lines, done.stderr.decode()
    return done.returncode, json.loads(lines[-1])


def test_seccomp_filter_blocks_files_network_processes_and_exec(workdir: Path) -> None:
    returncode, results = _probe(workdir, with_filter=True)
    assert results == {
        "mode": 2,
        "open_read": "EPERM",
        "open_write": "EPERM",
        "open_from_earlier_thread": "EPERM",  # TSYNC: threads created before the filter are covered
        "tcp_socket": "EPERM",
        "unix_socket": "EPERM",
        "fork": "EPERM",
        "signal_other_process": "EPERM",
        "signal_self": "ok",
        "subprocess": "EPERM",
        "new_thread": "ok",  # clone with CLONE_THREAD stays allowed
    }
    assert returncode == -signal.SIGSYS  # execve kills the process
    assert not (workdir / "probe-written").exists()


def test_negative_control_without_the_filter_everything_works(workdir: Path) -> None:
    returncode, results = _probe(workdir, with_filter=False)
    assert results["mode"] == 0
    assert {k: v for k, v in results.items() if k != "mode"} == dict.fromkeys(
        [
            "open_read",
            "open_write",
            "open_from_earlier_thread",
            "tcp_socket",
            "unix_socket",
            "fork",
            "signal_other_process",
            "signal_self",
            "subprocess",
            "new_thread",
        ],
        "ok",
    )
    assert returncode == 0  # /bin/true ran
    (workdir / "probe-written").unlink()


def test_loaded_enclave_runs_sandboxed(scores_enclave: EnclaveClient) -> None:
    assert {"seccomp", "non_dumpable", "core_limit_zero", "nofile_limited"} <= scores_enclave.info.sandbox
    pid = scores_enclave.pid
    tasks = os.listdir(f"/proc/{pid}/task")
    assert len(tasks) >= 2  # onnxruntime's pool thread (threads=2) was created before the filter
    for tid in tasks:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        assert "\nSeccomp:\t2\n" in status and "\nNoNewPrivs:\t1\n" in status, tid
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert any(
        line.startswith("Max core file size") and line.split()[4:6] == ["0", "0"] for line in limits.splitlines()
    )
    assert any(line.startswith("Max open files") and line.split()[3:5] == ["16", "16"] for line in limits.splitlines())
    assert scores_enclave.info.ready_seconds < 30 and scores_enclave.ping(4096) < 1.0


# --------------------------------------------------------------------------------------------
# The trusted side imports nothing from the host side


ALLOWED_THIRD_PARTY = {"numpy", "onnxruntime", "cryptography", "pyseccomp"}


def _import_allowed(name: str) -> bool:
    top = name.split(".")[0]
    if top == "modelcloak":
        return name == "modelcloak.enclave" or name.startswith("modelcloak.enclave.")
    return top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY


def forbidden_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every import in `source` (module `module`) that leaves the allowed set, including relative
    imports, imports inside functions and importlib.import_module/__import__ with a literal name."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from modelcloak import hygiene` imports modelcloak.hygiene: check each name then.
            names = [f"{target}.{a.name}" for a in node.names] if target == "modelcloak" else [target]
            if not node.module:
                names = [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [name for name in names if not _import_allowed(name)]
    return found


def test_enclave_package_imports_nothing_from_the_host_side() -> None:
    files = sorted(ENCLAVE_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"protocol.py", "policy.py", "sandbox.py", "server.py", "chunks.py"}
    for path in files:
        module = "modelcloak.enclave" + ("" if path.stem == "__init__" else f".{path.stem}")
        assert forbidden_imports(path.read_text(), module, is_package=path.stem == "__init__") == [], path


@pytest.mark.parametrize(
    "source",
    [
        "from modelcloak.hygiene import secret_buffer",
        "import modelcloak.runtime.session",
        "from modelcloak import errors",
        "from .. import hygiene",
        "from ..keys import providers",
        "def late():\n    import modelcloak.bundle",
        "import importlib\nimportlib.import_module('modelcloak.keys')",
        "import torch",
    ],
)
def test_negative_control_the_import_check_catches_host_imports(source: str) -> None:
    assert forbidden_imports(source, "modelcloak.enclave.server")


def test_negative_control_the_import_check_allows_the_enclave_package() -> None:
    allowed = "from . import chunks\nfrom modelcloak.enclave.protocol import encode_frame\nimport numpy, json"
    assert forbidden_imports(allowed, "modelcloak.enclave.server") == []


def test_enclave_process_loads_no_host_module() -> None:
    probe = (
        "import sys, modelcloak.enclave.server, modelcloak.enclave.__main__, modelcloak.enclave.sandbox; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'modelcloak')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert "modelcloak.enclave.server" in loaded
    # `python -m modelcloak.enclave` must import the parent package; its __init__ pulls in errors.py.
    host = [
        m for m in loaded if not m.startswith("modelcloak.enclave") and m not in ("modelcloak", "modelcloak.errors")
    ]
    assert host == []


# --------------------------------------------------------------------------------------------
# Transport for runtimes without descriptor passing (Gramine): the enclave dials the host


def test_enclave_can_dial_the_host_over_tcp(key_file: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        argv = [sys.executable, "-m", "modelcloak.enclave", "--connect", f"127.0.0.1:{port}"]
        proc = subprocess.Popen([*argv, "--key-file", str(key_file)], stderr=subprocess.DEVNULL)
        try:
            listener.settimeout(15)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(15)
                head = conn.recv(13, socket.MSG_WAITALL)
                length, msg_type, _ = protocol.decode_header(head)
                hello = protocol.decode_hello(conn.recv(length - 9, socket.MSG_WAITALL))
                assert msg_type == MsgType.HELLO
                assert hello.key_id == chunks.derive(ENCLAVE_KEY, b"", "key-id", 8).hex()
                conn.sendall(protocol.encode_frame(MsgType.SHUTDOWN, 1))
                assert protocol.decode_header(conn.recv(13, socket.MSG_WAITALL))[1] == MsgType.BYE
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# Gramine manifest


def test_gramine_manifest_is_toml_with_the_entry_point_and_a_production_enclave() -> None:
    text = render_manifest(sys.executable, threads=2)
    manifest = tomllib.loads(text)
    python = os.path.realpath(sys.executable)
    assert manifest["libos"]["entrypoint"] == python
    assert manifest["loader"]["entrypoint"] == "file:{{ gramine.libos }}"
    assert manifest["loader"]["argv"][:3] == [python, "-m", "modelcloak.enclave"]
    assert "sgx.debug = false" in text and manifest["sgx"]["debug"] is False
    assert manifest["sgx"]["remote_attestation"] == "dcap"
    assert manifest["sgx"]["max_threads"] >= 2 + 4
    assert manifest["loader"]["env"]["OMP_NUM_THREADS"] == "2"
    assert f"file:{python}" in manifest["sgx"]["trusted_files"]
    assert any(t.endswith("/modelcloak/enclave/") for t in manifest["sgx"]["trusted_files"])
    assert any(m.get("type") == "encrypted" for m in manifest["fs"]["mounts"])
    # Paths are escaped, not pasted: an odd path still gives valid TOML with the same value.
    odd = tomllib.loads(render_manifest('/opt/we"ird\\path/python3', stdlib=[], site_packages=[]))
    assert odd["libos"]["entrypoint"] == os.path.realpath('/opt/we"ird\\path/python3')


# --------------------------------------------------------------------------------------------
# Policy and codec units (no process)


def test_policy_parsing_and_canonical_form() -> None:
    assert parse_policy(None) == parse_policy({}) == OutputPolicy("label")
    policy = parse_policy({"output": "topk:5", "query_budget": 1000, "rate_limit_per_s": 2})
    assert policy == OutputPolicy("topk", 5, 1000, 2.0)
    assert parse_policy(policy.to_json()) == policy
    assert policy.to_json() == {"output": "topk:5", "query_budget": 1000, "rate_limit_per_s": 2.0}
    for bad in (
        {"output": "probabilities"},
        {"output": "topk:0"},
        {"output": "topk:3 "},
        {"query_budget": True},
        {"query_budget": -1},
        {"rate_limit_per_s": 0},
        {"rate_limit_per_s": float("inf")},
        {"expires": "2030-01-01"},  # a rule this enclave cannot enforce is refused, not ignored
        ["label"],
    ):
        with pytest.raises(PolicyError):
            parse_policy(bad)  # type: ignore[arg-type]


def test_output_policy_ties_and_integer_outputs() -> None:
    scores = np.array([[1.0, 3.0, 3.0, 0.0], [-1.0, -1.0, -2.0, -1.0]], dtype=np.float32)
    assert apply_output_policy(OutputPolicy("label"), ["y"], [scores])[0][1].tolist() == [1, 0]
    assert apply_output_policy(OutputPolicy("topk", 3), ["y"], [scores])[0][1].tolist() == [[1, 2, 0], [0, 1, 3]]
    ints = np.array([[0, 255, 7]], dtype=np.uint8)  # negating unsigned values would wrap
    assert apply_output_policy(OutputPolicy("topk", 2), ["y"], [ints])[0][1].tolist() == [[1, 2]]
    smallest = np.array([[-128, 127, 0]], dtype=np.int8)
    assert apply_output_policy(OutputPolicy("topk", 3), ["y"], [smallest])[0][1].tolist() == [[1, 2, 0]]


def test_meter_budget_and_token_bucket_with_a_fake_clock() -> None:
    now = [0.0]
    meter = Meter(OutputPolicy("label", query_budget=4, rate_limit_per_s=2.0), clock=lambda: now[0])
    meter.admit(2)
    meter.record(2)
    with pytest.raises(RateLimited, match="retry in 0.50 s"):
        meter.admit(1)
    now[0] = 0.5
    meter.admit(1)
    meter.record(1)
    now[0] = 10.0
    with pytest.raises(BudgetExhausted, match=r"\(2 samples asked, 1 of 4 left\)"):
        meter.admit(2)
    assert (meter.samples_served, meter.budget_left, meter.requests_refused) == (3, 1, 2)


def test_tensor_codec_round_trips_every_dtype_and_rejects_damage() -> None:
    tensors = [(f"t{code}", np.arange(6).reshape(2, 3).astype(dt)) for code, dt in protocol.DTYPE_BY_CODE.items()]
    tensors += [("scalar", np.array(3.5, np.float32)), ("empty", np.zeros((0, 4), np.int64)), ("ünï", np.ones(1))]
    decoded = protocol.decode_tensors(protocol.encode_tensors(tensors))
    assert [n for n, _ in decoded] == [n for n, _ in tensors]
    for (_, want), (_, got) in zip(tensors, decoded):
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    big_endian = np.arange(3, dtype=">i4")  # sent little-endian whatever the source byte order
    assert protocol.decode_tensors(protocol.encode_tensors([("b", big_endian)]))[0][1].tolist() == [0, 1, 2]
    payload = protocol.encode_tensors([("x", np.ones((2, 2), np.float32))])
    for damaged in (payload[:-1], payload + b"\x00", b"", b"\xff\xff", payload[:3]):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_tensors(damaged)
    with pytest.raises(protocol.ProtocolError):
        protocol.encode_tensors([("s", np.array(["text"]))])
    no_data_huge_dims = struct.pack(">H", 1) + b"\x00\x01x" + struct.pack(">BB2Q", 1, 2, 0, 2**63)
    with pytest.raises(protocol.ProtocolError, match="cannot represent"):
        protocol.decode_tensors(no_data_huge_dims)
