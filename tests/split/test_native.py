"""The native enclave: private parts compiled to C, driven through the unchanged EnclaveClient.

Real gcc, real libcrypto, real processes. Correctness is measured against onnxruntime on the
whole model for every cut; the policy, budget, key, header and frame tests of the Python enclave
(tests/split/test_enclave.py) are repeated against a native binary built for each sealed bundle; the
host memory scan of tests/split/test_split_leaks.py is repeated with the native enclave, with its
negative control.
"""

# The fixtures of tests/split/test_enclave.py are imported and then named as test arguments.
# ruff: noqa: F811

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import native_models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import split_models
from native_toolchain import require_toolchain
from onnx import TensorProto, helper, numpy_helper
from test_enclave import (  # noqa: F401  (fixtures are used by name)
    CLASSES,
    ENCLAVE_KEY,
    IN,
    RawEnclave,
    _edit_manifest,
    key_file,
    model,
    other_key_file,
    reference,
    samples,
    seal,
    workdir,
)
from test_split_leaks import _scan_memory

from modelcloak.enclave import protocol
from modelcloak.enclave.policy import OutputPolicy
from modelcloak.enclave.protocol import ErrorCode, MsgType
from modelcloak.inference import load
from modelcloak.keys import generate_key_file
from modelcloak.model.cut import candidate_cuts, find_cut, split_model
from modelcloak.native import NativeError, build_for_header, check_supported
from modelcloak.protector import protect
from modelcloak.runtime.enclave_client import EnclaveClient, EnclaveError


@pytest.fixture(scope="module", autouse=True)
def _require_toolchain() -> None:
    require_toolchain()


@pytest.fixture(scope="module")
def native_seal(seal, model, workdir):  # noqa: ANN001, ANN201
    """native_seal(policy) -> (header, ciphertext, binary) for a fresh bundle and its native enclave."""
    private = model.SerializeToString()
    counter = iter(range(10**6))

    def make(policy: dict | None) -> tuple[bytes, bytes, str]:
        header, ciphertext = seal(policy)
        build = build_for_header(header, private, workdir / f"native-{next(counter)}")
        return header, ciphertext, str(build.binary)

    return make


@contextmanager
def native(
    binary: str, key_args: list[str], sealed: tuple[bytes, bytes] | None = None, **kwargs
) -> Iterator[EnclaveClient]:
    client = EnclaveClient(command=[binary], **kwargs)
    try:
        client.start(key_args)
        if sealed is not None:
            client.load(*sealed)
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# Outputs equal onnxruntime through protect -> load, for every cut


def _split_session_outputs(model_proto: onnx.ModelProto, cut: dict, x: np.ndarray, folder: Path) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    host_key, enclave_key = generate_key_file(folder / "host.key"), generate_key_file(folder / "enclave.key")
    bundle = folder / "model.mcb"
    protect(
        model_proto,
        bundle,
        key=host_key,
        scheme="split",
        cut=cut,
        enclave_key=enclave_key,
        policy={"output": "scores"},
        native_enclave=folder / "native",
    )
    binary = folder / "native" / "modelcloak-enclave"
    with load(bundle, key=host_key, enclave_key_file=enclave_key.path, enclave_command=[str(binary)]) as session:
        assert session.enclave.info.policy.output == "scores"
        (result,) = session.run(x).values()
        return result


def test_every_mlp_cut_matches_onnxruntime_through_the_native_enclave(tmp_path: Path) -> None:
    whole = split_models.mlp()
    x = split_models.sample_input("mlp", 37)["x"]
    expected = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    cuts = candidate_cuts(whole)
    assert len(cuts) >= 4
    for index in range(len(cuts)):
        got = _split_session_outputs(whole, {"index": index}, x, tmp_path / f"cut{index}")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4, err_msg=f"cut {index}")


def test_mnist_cnn_dense_head_matches_onnxruntime(tmp_path: Path) -> None:
    whole = split_models.cnn()
    x = split_models.sample_input("cnn", 9)["x"]
    expected = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    last_pool = [node.name for node in whole.graph.node if node.op_type == "MaxPool"][-1]
    _, private = split_model(whole, find_cut(whole, after_node=last_pool))
    assert [n.op_type for n in private.graph.node] == ["Reshape", "Gemm", "Relu", "Gemm"]  # the dense head
    got = _split_session_outputs(whole, {"after_node": last_pool}, x, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def _with_private_op(op: str) -> onnx.ModelProto:
    """x -> Gemm -> <op> -> Gemm: the private part (last 2 nodes) starts with `op`."""
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node(op, ["h"], ["z"], name="odd"),
            helper.make_node("Gemm", ["z", "w2"], ["y"], name="fc2"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    return proto


def test_an_unsupported_op_is_refused_at_protect_time_with_its_name(tmp_path: Path) -> None:
    host_key, enclave_key = generate_key_file(tmp_path / "h.key"), generate_key_file(tmp_path / "e.key")
    bundle = tmp_path / "m.mcb"
    with pytest.raises(NativeError, match="does not implement ONNX op 'Round'"):
        protect(
            _with_private_op("Round"),
            bundle,
            key=host_key,
            scheme="split",
            cut={"after_node": "fc1"},
            enclave_key=enclave_key,
            native_enclave=tmp_path / "native",
        )
    assert not bundle.exists() and not (tmp_path / "native").exists(), "nothing is written for a refused part"
    # Negative control: the same graph with a supported op in that place protects and builds.
    protect(
        _with_private_op("Tanh"),
        bundle,
        key=host_key,
        scheme="split",
        cut={"after_node": "fc1"},
        enclave_key=enclave_key,
        native_enclave=tmp_path / "native",
    )
    assert (tmp_path / "native" / "modelcloak-enclave").exists()
    with pytest.raises(NativeError, match="'Einsum'"):
        check_supported(
            onnx.helper.make_model(helper.make_graph([helper.make_node("Einsum", ["a", "b"], ["c"])], "g", [], []))
        )


# --------------------------------------------------------------------------------------------
# Policies, budget, keys and header authentication: the Python enclave's tests, native binary


def test_native_ready_matches_the_python_enclave_and_scores_equal_onnxruntime(native_seal, key_file, reference) -> None:
    header, ciphertext, binary = native_seal({"output": "scores"})
    with native(binary, ["--key-file", str(key_file)], (header, ciphertext)) as fast:
        python = EnclaveClient()
        try:
            python.start(["--key-file", str(key_file)], threads=1)
            reference_info = python.load(header, ciphertext)
            python_key_id = python.key_id
        finally:
            python.close()
        info = fast.info
        assert (info.inputs, info.outputs, info.private_outputs, info.policy) == (
            reference_info.inputs,
            reference_info.outputs,
            reference_info.private_outputs,
            reference_info.policy,
        )
        assert {"seccomp", "non_dumpable", "core_limit_zero", "nofile_limited"} <= info.sandbox
        assert fast.key_id == python_key_id
        for batch in (1, 3, 64, 65, 200):  # around the tile size (64)
            x = samples(batch, batch)
            np.testing.assert_allclose(fast.infer({"h": x})["logits"], reference(x), rtol=0, atol=1e-5)


def test_native_label_and_topk_policies(native_seal, key_file, reference) -> None:
    header, ciphertext, binary = native_seal(None)  # label is the default
    with native(binary, ["--key-file", str(key_file)], (header, ciphertext)) as client:
        assert client.info.policy == OutputPolicy("label")
        assert [(s.name, s.dtype, s.shape) for s in client.info.outputs] == [("label", np.dtype("int64"), (None,))]
        x = samples(2, 33)
        out = client.infer({"h": x})
        assert list(out) == ["label"] and out["label"].dtype == np.int64 and out["label"].shape == (33,)
        np.testing.assert_array_equal(out["label"], np.argmax(reference(x), axis=-1))
        pid = client.pid
    assert client.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    header, ciphertext, binary = native_seal({"output": "topk:3"})
    env = {**os.environ, "MC_TEST_ENCLAVE_KEY": ENCLAVE_KEY.hex()}
    with native(binary, ["--key-env", "MC_TEST_ENCLAVE_KEY"], (header, ciphertext), env=env) as client:
        x = samples(3, 9)
        out = client.infer({"h": x})
        assert out["topk"].shape == (9, 3)
        np.testing.assert_array_equal(out["topk"], np.argsort(-reference(x), axis=-1, kind="stable")[:, :3])


def test_native_query_budget_is_exact_and_rate_limited(native_seal, key_file) -> None:
    header, ciphertext, binary = native_seal({"output": "label", "query_budget": 10})
    with native(binary, ["--key-file", str(key_file)], (header, ciphertext)) as client:
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
        # a restart is a fresh process: the budget is per session, as documented for the Python enclave
    header, ciphertext, binary = native_seal({"rate_limit_per_s": 1.0})
    with native(binary, ["--key-file", str(key_file)], (header, ciphertext)) as client:
        client.infer({"h": samples(8, 1)})
        with pytest.raises(EnclaveError, match="rate limit of 1 samples/s reached") as caught:
            client.infer({"h": samples(9, 1)})
        assert caught.value.code == ErrorCode.RATE_LIMITED
        with pytest.raises(EnclaveError, match="exceeds the rate limit's burst of 1 samples"):
            client.infer({"h": samples(10, 2)})


def test_native_wrong_key_edited_header_and_loose_key_file(native_seal, key_file, other_key_file, workdir) -> None:
    header, ciphertext, binary = native_seal({"output": "label", "query_budget": 5})
    with native(binary, ["--key-file", str(other_key_file)]) as client:
        with pytest.raises(EnclaveError) as caught:
            client.load(header, ciphertext)
        assert str(caught.value).startswith("wrong enclave key: ") and client.key_id in str(caught.value)
        assert caught.value.code == ErrorCode.WRONG_KEY
    to_scores = _edit_manifest(header, b'"output":"label"', b'"output":"scores"')
    more_budget = _edit_manifest(header, b'"query_budget":5', b'"query_budget":9')
    tampered = bytearray(ciphertext)
    tampered[len(ciphertext) // 2] ^= 0x80
    with native(binary, ["--key-file", str(key_file)]) as client:
        for bad_header in (to_scores, more_budget):
            with pytest.raises(EnclaveError, match="failed authentication") as caught:
                client.load(bad_header, ciphertext)
            assert caught.value.code == ErrorCode.AUTH_FAILED
        with pytest.raises(EnclaveError, match="failed authentication at chunk") as caught:
            client.load(header, bytes(tampered))
        assert caught.value.code == ErrorCode.AUTH_FAILED
        with pytest.raises(EnclaveError, match="ciphertext bytes") as caught:
            client.load(header, ciphertext[:-1])
        assert caught.value.code == ErrorCode.BAD_HEADER
        info = client.load(header, ciphertext)  # negative control: the untouched bundle loads
        assert info.policy == OutputPolicy("label", query_budget=5)
    loose = workdir / "loose-native.key"
    loose.write_text(ENCLAVE_KEY.hex())
    loose.chmod(0o644)
    client = EnclaveClient(command=[binary])
    with pytest.raises(EnclaveError, match="readable by other users"):
        client.start(["--key-file", str(loose)])
    assert client.returncode == 2


class NativeRaw(RawEnclave):
    def __init__(self, binary: str, key_path: Path, *extra: str) -> None:
        import socket

        parent, child = socket.socketpair()
        argv = [binary, "--fd", str(child.fileno()), "--key-file", str(key_path), *extra]
        self.proc = subprocess.Popen(
            argv, pass_fds=(child.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        child.close()
        self.sock = parent
        self.sock.settimeout(15)


def test_native_malformed_frames_get_errors_and_it_keeps_serving(native_seal, key_file, reference) -> None:
    header, ciphertext, binary = native_seal({"output": "scores"})
    raw = NativeRaw(binary, key_file, "--max-frame-bytes", "65536")
    try:
        assert raw.recv()[0] == MsgType.HELLO
        x = samples(12, 3)
        good = protocol.encode_tensors([("h", x)])
        raw.frame(MsgType.INFER, 1, good)
        raw.expect_error(1, ErrorCode.BAD_STATE)
        raw.frame(MsgType.LOAD_DATA, 2, b"stray")
        raw.expect_error(2, ErrorCode.BAD_STATE)
        raw.frame(MsgType.LOAD, 3, protocol.encode_load(header, len(ciphertext)))
        raw.frame(MsgType.LOAD_DATA, 3, ciphertext[:100])
        raw.frame(MsgType.PING, 4, b"still there?")
        assert "interrupted" in raw.expect_error(3, ErrorCode.BAD_STATE)
        assert raw.recv() == (MsgType.PONG, 4, b"still there?")
        raw.load(5, header, ciphertext)
        assert raw.recv()[:2] == (MsgType.READY, 5)

        def still_serving(request_id: int) -> None:
            np.testing.assert_allclose(raw.infer(request_id, x), reference(x), atol=1e-5)

        still_serving(6)
        raw.frame(0x42, 7, b"what is this")
        raw.expect_error(7, ErrorCode.UNKNOWN_TYPE)
        raw.send(struct.pack(">I", 3) + b"abc")
        raw.expect_error(0, ErrorCode.MALFORMED_FRAME)
        raw.send(protocol.FRAME_HEADER.pack(65537, MsgType.INFER, 10))
        raw.expect_error(10, ErrorCode.FRAME_TOO_LARGE)
        raw.send(bytes(65537 - 9))
        still_serving(11)
        raw.frame(MsgType.INFER, 12, good[:-5])
        raw.expect_error(12, ErrorCode.BAD_TENSOR)
        raw.frame(MsgType.INFER, 13, good + b"\x00")
        raw.expect_error(13, ErrorCode.BAD_TENSOR)
        bad_dtype = bytearray(good)
        bad_dtype[2 + 2 + 1] = 99
        raw.frame(MsgType.INFER, 14, bytes(bad_dtype))
        assert "dtype code 99" in raw.expect_error(14, ErrorCode.BAD_TENSOR)
        raw.frame(MsgType.INFER, 15, protocol.encode_tensors([("h", x.astype(np.float64))]))
        assert "must be float32, got float64" in raw.expect_error(15, ErrorCode.BAD_INPUT)
        raw.frame(MsgType.INFER, 16, protocol.encode_tensors([("h", np.zeros((2, 5), np.float32))]))
        assert "shape [?, 16]" in raw.expect_error(16, ErrorCode.BAD_INPUT)
        raw.frame(MsgType.INFER, 17, protocol.encode_tensors([("h", x), ("extra", x)]))
        assert "unknown 'extra'" in raw.expect_error(17, ErrorCode.BAD_INPUT)
        raw.frame(MsgType.INFER, 18, protocol.encode_tensors([("h", x), ("h", x)]))
        assert "appears twice" in raw.expect_error(18, ErrorCode.BAD_INPUT)
        huge = struct.pack(">HH", 1, 1) + b"h" + struct.pack(">BBQQ", 1, 2, 2**62, 2**62)
        raw.frame(MsgType.INFER, 19, huge)  # sizes that overflow 64 bits
        raw.expect_error(19, ErrorCode.BAD_TENSOR)
        raw.frame(MsgType.INFER, 20, protocol.encode_tensors([("h", np.zeros((5000, IN), np.float32))]))
        raw.expect_error(20, ErrorCode.FRAME_TOO_LARGE)  # the request fits, its scores would not
        raw.frame(MsgType.LOAD, 21, b"\x00\x00")
        raw.expect_error(21, ErrorCode.MALFORMED_FRAME)
        raw.load(22, header, ciphertext)
        raw.expect_error(22, ErrorCode.BAD_STATE)
        still_serving(23)
        raw.damaged_infers(good, range(100, 600))
        still_serving(700)
        raw.frame(MsgType.STATS, 701)
        assert raw.recv()[:2] == (MsgType.STATS_REPLY, 701)
        raw.frame(MsgType.SHUTDOWN, 702)
        assert raw.recv()[:2] == (MsgType.BYE, 702)
        assert raw.proc.wait(timeout=10) == 0
    finally:
        raw.close()


def _seccomp_mode(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Seccomp:"))


def test_native_enclave_runs_sandboxed_and_the_check_can_fail(native_seal, key_file) -> None:
    header, ciphertext, binary = native_seal({"output": "scores"})
    with native(binary, ["--key-file", str(key_file)], (header, ciphertext)) as client:
        assert _seccomp_mode(client.pid) == "2"
        limits = Path(f"/proc/{client.pid}/limits").read_text().splitlines()
        assert any(line.startswith("Max open files") and line.split()[3:5] == ["16", "16"] for line in limits)
        assert any(line.startswith("Max core file size") and line.split()[4:6] == ["0", "0"] for line in limits)
        assert len(os.listdir(f"/proc/{client.pid}/task")) == 1  # one thread, nothing allocated later
    # Negative control: with the filter off, the same check sees no filter.
    with native(binary, ["--key-file", str(key_file)], (header, ciphertext), extra_args=["--seccomp", "off"]) as client:
        assert _seccomp_mode(client.pid) == "0" and "seccomp" not in client.info.sandbox


# --------------------------------------------------------------------------------------------
# The private weights are in the native enclave's memory, not the host's


PROBE = """
import os, sys
import numpy as np
from modelcloak.keys import KeyFile
from modelcloak.inference import load
bundle, host_key, enclave_key, binary, mode, private = sys.argv[1:7]
leaked = open(private, "rb").read() if mode == "leak" else b""
with load(bundle, key=KeyFile(host_key), enclave_key_file=enclave_key, enclave_command=[binary]) as session:
    for batch in (1, 4):
        session.run(np.ones((batch, 64), np.float32))
    print("ready", os.getpid(), session.enclave.pid, len(leaked), flush=True)
    sys.stdin.readline()
"""


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs /proc")
def test_private_weights_are_in_the_native_enclave_not_in_host_memory(tmp_path: Path) -> None:
    from models import make_mlp

    whole = make_mlp((64, 128, 256, 10), seed=21)
    _, private = split_model(whole, find_cut(whole, last=2))
    (tmp_path / "private.onnx").write_bytes(private.SerializeToString())
    canaries = []
    for tensor in private.graph.initializer:
        if len(tensor.raw_data) >= 1024:
            for start in np.linspace(0, len(tensor.raw_data) - 32, 6).astype(int):
                canaries.append(tensor.raw_data[start : start + 32])
    assert len(canaries) >= 6
    host_key, enclave_key = generate_key_file(tmp_path / "host.key"), generate_key_file(tmp_path / "enclave.key")
    bundle = tmp_path / "model.mcb"
    protect(
        whole,
        bundle,
        key=host_key,
        scheme="split",
        cut={"last": 2},
        enclave_key=enclave_key,
        native_enclave=tmp_path / "native",
    )
    (tmp_path / "probe.py").write_text(PROBE)
    found = {}
    for mode in ("clean", "leak"):
        child = subprocess.Popen(
            [
                sys.executable,
                str(tmp_path / "probe.py"),
                str(bundle),
                str(host_key.path),
                str(enclave_key.path),
                str(tmp_path / "native" / "modelcloak-enclave"),
                mode,
                str(tmp_path / "private.onnx"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        try:
            line = child.stdout.readline().split()
            assert line and line[0] == "ready", child.stderr.read()
            host_pid, enclave_pid = int(line[1]), int(line[2])
            found[mode] = (_scan_memory(host_pid, canaries), _scan_memory(enclave_pid, canaries))
        finally:
            child.communicate("\n", timeout=30)
        assert child.returncode == 0
    assert found["clean"][0] == 0, "private weight bytes found in the host process"
    # The scanner can see the weights: in the native enclave (resident), and in a leaking host.
    assert found["clean"][1] > 0
    assert found["leak"][0] == len(canaries)


# --------------------------------------------------------------------------------------------
# Convolutions, BatchNorm and the other layers of the supported models


def _native_equals_onnxruntime(
    whole: onnx.ModelProto, feeds: dict[str, np.ndarray], folder: Path, select: Sequence[int] | None = None
) -> tuple[int, dict[int, str]]:
    """The candidate cuts of `whole` (those at the positions in `select`, or all) through a native
    enclave (raw frames skipped: EnclaveClient), compared with onnxruntime on the private part.
    Returns how many cuts were checked, and the cuts the native enclave refused with their messages."""
    from modelcloak.bundle.container import Bundle, SectionSource, write_bundle

    folder.mkdir(parents=True, exist_ok=True)
    key_path = folder / "enclave.key"
    key_path.write_text(ENCLAVE_KEY.hex())
    key_path.chmod(0o600)
    checked, refused = 0, {}
    cuts = candidate_cuts(whole)
    for index in range(len(cuts)) if select is None else select:
        public, private = split_model(whole, cuts[index])
        private_bytes = private.SerializeToString()
        bundle = folder / f"cut{index}.mcb"
        write_bundle(
            bundle,
            master_key=bytes(32),
            key_spec={"provider": "keyfile", "kdf": None},
            scheme="split",
            sections=[SectionSource("private", len(private_bytes), lambda data=private_bytes: [data], key="enclave")],
            extra={"policy": {"output": "scores"}},
            enclave_key=ENCLAVE_KEY,
            enclave_key_spec={"provider": "keyfile"},
            chunk_size=4096,
        )
        with Bundle.open(bundle) as sealed:
            header, ciphertext = sealed.header, sealed.section_ciphertext("private")
        try:
            build = build_for_header(header, private_bytes, folder / f"native{index}")
        except NativeError as exc:
            refused[index] = str(exc)
            continue
        boundary = dict(
            zip(
                [v.name for v in public.graph.output],
                ort.InferenceSession(public.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds),
            )
        )
        reference_session = ort.InferenceSession(private_bytes, providers=["CPUExecutionProvider"])
        inputs = {spec.name: boundary[spec.name] for spec in reference_session.get_inputs()}
        expected = reference_session.run(None, inputs)
        with native(str(build.binary), ["--key-file", str(key_path)], (header, ciphertext)) as client:
            got = client.infer(inputs)
        for spec, value in zip(reference_session.get_outputs(), expected):
            np.testing.assert_allclose(got[spec.name], value, rtol=0, atol=1e-4, err_msg=f"cut {index}")
        checked += 1
    return checked, refused


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "residual_bn", "text_cnn"])
def test_every_cut_of_the_test_architectures_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    whole = split_models.BUILDERS[name]()
    public_input = split_models.sample_input(name, 5)
    assert _native_equals_onnxruntime(whole, public_input, tmp_path) == (len(candidate_cuts(whole)), {})


def _window_zoo() -> onnx.ModelProto:
    """Conv(stride 2, pads) -> BatchNorm (folded) -> Relu -> depthwise Conv (dilation 2)
    -> grouped Conv (SAME_UPPER) -> [AveragePool | MaxPool with pads] -> Concat -> standalone BatchNorm -> Sigmoid
    -> Transpose -> Flatten -> Gemm(transB) -> Softmax: each layout case of the window kernels."""
    rng = np.random.default_rng(11)

    def tensor(name: str, *shape: int, positive: bool = False) -> onnx.TensorProto:
        value = rng.standard_normal(shape).astype(np.float32) * 0.5
        return numpy_helper.from_array(np.abs(value) + 0.5 if positive else value, name)

    inits = [
        tensor("w1", 8, 4, 3, 3), tensor("b1", 8),
        tensor("g1", 8, positive=True), tensor("be1", 8), tensor("m1", 8), tensor("v1", 8, positive=True),
        tensor("w2", 8, 1, 3, 3), tensor("w3", 6, 4, 3, 3), tensor("b3", 6),
        tensor("g2", 12, positive=True), tensor("be2", 12), tensor("m2", 12), tensor("v2", 12, positive=True),
        tensor("w4", 5, 12 * 5 * 5), tensor("b4", 5),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], group=8, dilations=[2, 2], pads=[2, 2, 2, 2]),
        helper.make_node("Conv", ["c2", "w3", "b3"], ["c3"], group=2, auto_pad="SAME_UPPER"),
        helper.make_node("AveragePool", ["c3"], ["p1"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], count_include_pad=1),
        helper.make_node("MaxPool", ["c3"], ["p2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["p1", "p2"], ["cat"], axis=1),
        helper.make_node("BatchNormalization", ["cat", "g2", "be2", "m2", "v2"], ["n2"]),
        helper.make_node("Sigmoid", ["n2"], ["s"]),
        helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["t"], ["f"]),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["logits"], transB=1, alpha=0.5),
        helper.make_node("Softmax", ["logits"], ["probs"]),
    ]
    graph = helper.make_graph(
        nodes,
        "windows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 9, 9])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 5])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.mark.slow
def test_conv_batchnorm_pooling_concat_transpose_cuts_match_onnxruntime(tmp_path: Path) -> None:
    whole = _window_zoo()
    x = np.random.default_rng(3).standard_normal((7, 4, 9, 9)).astype(np.float32)
    checked, refused = _native_equals_onnxruntime(whole, {"x": x}, tmp_path)
    assert checked == len(candidate_cuts(whole)) >= 10 and not refused


@pytest.mark.slow
def test_small_bert_cuts_match_onnxruntime_or_are_refused_by_name(tmp_path: Path) -> None:
    """LayerNorm, attention (MatMul of two activations, Softmax, Transpose/Reshape), GELU and the
    [CLS] Gather of a BERT-style encoder exported from PyTorch. The cuts whose private part still
    reads the int64 attention mask (the Cast to float is private) are refused, naming the op."""
    whole = native_models.bert()
    cuts = candidate_cuts(whole)
    private_ops = [{n.op_type for n in split_model(whole, cut)[1].graph.node} for cut in cuts]
    mask_reading = {i for i, ops in enumerate(private_ops) if "Cast" in ops}
    assert 0 < len(mask_reading) <= 4
    largest = max(mask_reading) + 1  # the largest private part that takes only float inputs
    assert {"LayerNormalization", "MatMul", "Softmax", "Transpose", "Reshape", "Gelu", "Gather"} <= private_ops[largest]
    # Every cut is a suffix of the one before; every 5th keeps the test to a few minutes of builds.
    select = sorted({*range(0, len(cuts), 5), largest, len(cuts) - 1})
    checked, refused = _native_equals_onnxruntime(whole, native_models.bert_input(5, seed=1), tmp_path, select)
    assert set(refused) == mask_reading & set(select) and refused
    assert all("does not implement ONNX op 'Cast'" in message for message in refused.values())
    assert checked == len(select) - len(refused) >= 12


@pytest.mark.slow
def test_efficientnet_lite0_cuts_match_onnxruntime(tmp_path: Path) -> None:
    """The ImageNet EfficientNet-Lite0 (offline weights; BN folded by the exporter; ReLU6 as Clip;
    depthwise, strided and 1x1 convolutions): the largest private part (all but the stem), one from
    the middle, and every cut through the last stage and the head."""
    whole = native_models.efficientnet_lite0()
    count = len(candidate_cuts(whole))
    select = [0, count // 2, *range(count - 12, count)]
    checked, refused = _native_equals_onnxruntime(whole, native_models.efficientnet_input(3, seed=2), tmp_path, select)
    assert (checked, refused) == (len(select), {})
