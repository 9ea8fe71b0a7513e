"""Soft lock: FP32 accurate, INT8/FP16 at chance, checked on models quantised by onnxruntime itself.

Every accuracy here comes from an ONNX export run in onnxruntime: `quantize_dynamic`,
`quantize_static` (with a calibration reader) and `convert_float_to_float16` build the variants,
nothing is simulated in torch. The negative controls run the same pipeline on the un-locked
model (every variant keeps its accuracy) and on the locked model with the offset taken out (the
attacker who knows the construction), so a lock that did nothing, or an evaluation that always
reports chance, would fail them.
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")

from modelcloak.lock.errors import LockError  # noqa: E402
from modelcloak.lock.soft import (  # noqa: E402
    DEFAULT_OFFSET_EXPONENT,
    EXTRA_VARIANTS,
    VARIANTS,
    evaluate_variants,
    find_lock_site,
    quantised_variants,
    soft_lock,
)
from modelcloak.model.torch_export import export_torch  # noqa: E402
from modelcloak.training import train_classifier  # noqa: E402
from modelcloak.zoo.mnist import load_mnist, small_cnn  # noqa: E402

CHANCE = 0.10  # ten balanced classes
TARGET = CHANCE + 0.05  # the bound for the locked INT8 (and our aim for FP16)
LOW_PRECISION = [name for name in VARIANTS if name != "fp32"]


@pytest.fixture(autouse=True, scope="module")
def _quiet_quantisers():
    # onnxruntime's quantisers log a pre-processing hint and calibration chatter on every call.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(previous)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Case:
    """One model, its soft-locked copy, and every variant's accuracy on held-out data."""

    def __init__(self, original, x_train, y_train, x_test, y_test, sample, *, train_epochs, lock_epochs):
        self.original = train_classifier(original, x_train, y_train, epochs=train_epochs, progress=False)
        self.snapshot = copy.deepcopy(self.original.state_dict())
        self.locked = soft_lock(self.original, x_train, y_train, epochs=lock_epochs, progress=False)
        self.x_train, self.y_train, self.x_test, self.y_test, self.sample = x_train, y_train, x_test, y_test, sample
        self.calibration = x_train[:256]
        self.original_onnx = export_torch(self.original, sample)
        self.locked_onnx = export_torch(self.locked, sample)
        self.original_acc = evaluate_variants(quantised_variants(self.original_onnx, self.calibration), x_test, y_test)
        self.refused: dict[str, str] = {}
        self.locked_variants = quantised_variants(self.locked_onnx, self.calibration, extra=True, refused=self.refused)
        self.locked_acc = evaluate_variants(self.locked_variants, x_test, y_test)


@pytest.fixture(scope="module")
def mnist_case() -> Case:
    data = load_mnist()
    return Case(
        small_cnn(seed=0),
        data.x_train,
        data.y_train,
        data.x_test,
        data.y_test,
        torch.zeros(2, 1, 28, 28),
        train_epochs=4,
        lock_epochs=2,
    )


def digits_mlp(seed: int = 0) -> torch.nn.Module:
    nn = torch.nn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def digits_case() -> Case:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return Case(digits_mlp(), x_train, y_train, x_test, y_test, torch.zeros(2, 64), train_epochs=20, lock_epochs=10)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _without_offset(case: Case) -> torch.nn.Module:
    """The attacker who has read docs/LOCK.md: take C out of the bias and drop the ReLU it bypasses."""
    site = find_lock_site(case.locked)
    model = copy.deepcopy(case.locked)
    with torch.no_grad():
        model[site.producer].bias.sub_(2.0**DEFAULT_OFFSET_EXPONENT)
    model[site.relu] = torch.nn.Identity()
    return model


# --------------------------------------------------------------------------------------------
# MNIST, small CNN
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_original_is_a_real_classifier(mnist_case: Case) -> None:
    assert mnist_case.original_acc["fp32"] > 0.90


@pytest.mark.slow
def test_locked_fp32_stays_within_one_point_of_the_original(mnist_case: Case) -> None:
    assert mnist_case.locked_acc["fp32"] >= mnist_case.original_acc["fp32"] - 0.01


@pytest.mark.parametrize("variant", LOW_PRECISION)
@pytest.mark.slow
def test_locked_low_precision_variants_fall_to_chance(mnist_case: Case, variant: str) -> None:
    assert mnist_case.locked_acc[variant] <= TARGET, mnist_case.locked_acc


@pytest.mark.parametrize("variant", LOW_PRECISION)
@pytest.mark.slow
def test_control_the_unlocked_model_keeps_its_accuracy_in_every_variant(mnist_case: Case, variant: str) -> None:
    # The same quantisers and evaluation on the original: if these fell too, the chance results
    # above would say nothing about the lock.
    assert mnist_case.original_acc[variant] >= mnist_case.original_acc["fp32"] - 0.02, mnist_case.original_acc


@pytest.mark.parametrize("variant", EXTRA_VARIANTS)
@pytest.mark.slow
def test_per_channel_qoperator_and_percentile_quantisation_do_not_escape(mnist_case: Case, variant: str) -> None:
    if variant in mnist_case.refused:
        return  # the quantiser refusing the locked model is no deployment either
    assert mnist_case.locked_acc[variant] <= TARGET, mnist_case.locked_acc


@pytest.mark.slow
def test_another_calibration_set_does_not_escape(mnist_case: Case) -> None:
    # The attacker calibrates on other digits (half of the test set) and evaluates on the rest.
    half = len(mnist_case.x_test) // 2
    variants = quantised_variants(mnist_case.locked_onnx, mnist_case.x_test[:half])
    accuracy = evaluate_variants(variants, mnist_case.x_test[half:], mnist_case.y_test[half:])
    assert accuracy["fp32"] > 0.9
    assert accuracy["int8-static"] <= TARGET + 0.02, accuracy  # 500 digits: allow sampling noise


@pytest.mark.slow
def test_locked_int8_outputs_are_finite_and_independent_of_the_input(mnist_case: Case) -> None:
    # Chance comes from the mechanism (every input gives the same output), not from NaN rows.
    for name in ("int8-dynamic", "int8-static", "fp16"):
        logits = _outputs(mnist_case.locked_variants[name], mnist_case.x_test[:64])
        assert np.isfinite(logits).all(), name
        assert len(np.unique(np.argmax(logits, axis=1))) == 1, name
    fp32 = _outputs(mnist_case.locked_variants["fp32"], mnist_case.x_test[:64])
    assert len(np.unique(np.argmax(fp32, axis=1))) > 5


@pytest.mark.slow
def test_control_taking_the_offset_out_unlocks_int8(mnist_case: Case) -> None:
    # The fine-tune alone does not lock; the offset does. This is also the documented limit:
    # whoever knows the construction undoes it with two edits and no data.
    unlocked = export_torch(_without_offset(mnist_case), mnist_case.sample)
    accuracy = evaluate_variants(
        quantised_variants(unlocked, mnist_case.calibration), mnist_case.x_test, mnist_case.y_test
    )
    for name in VARIANTS:
        assert accuracy[name] >= mnist_case.locked_acc["fp32"] - 0.02, accuracy


@pytest.mark.slow
def test_consumer_weights_sum_to_zero_in_fp32_and_below_zero_in_fp16(mnist_case: Case) -> None:
    site = find_lock_site(mnist_case.locked)
    weight = mnist_case.locked[site.consumer].weight.detach().double().numpy()
    scale = np.abs(weight).sum(axis=1)
    assert np.all(np.abs(weight.sum(axis=1)) <= 1e-6 * scale)
    fp16_sums = weight.astype(np.float16).astype(np.float64).sum(axis=1)
    assert np.mean(fp16_sums < 0) > 0.99


@pytest.mark.slow
def test_the_original_module_is_not_modified(mnist_case: Case) -> None:
    for name, tensor in mnist_case.original.state_dict().items():
        assert torch.equal(tensor, mnist_case.snapshot[name]), name
    assert isinstance(mnist_case.original[1], torch.nn.ReLU)


# --------------------------------------------------------------------------------------------
# Second model: an MLP on scikit-learn's 8x8 digits
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_digits_mlp_fp32_stays_within_one_point(digits_case: Case) -> None:
    assert digits_case.original_acc["fp32"] > 0.9
    assert digits_case.locked_acc["fp32"] >= digits_case.original_acc["fp32"] - 0.01


@pytest.mark.parametrize("variant", LOW_PRECISION)
@pytest.mark.slow
def test_digits_mlp_low_precision_variants_fall_to_chance(digits_case: Case, variant: str) -> None:
    assert digits_case.locked_acc[variant] <= TARGET, digits_case.locked_acc
    assert digits_case.original_acc[variant] >= digits_case.original_acc["fp32"] - 0.02, digits_case.original_acc


# --------------------------------------------------------------------------------------------
# Bad input: one LockError line naming the problem
# --------------------------------------------------------------------------------------------


def test_a_module_without_a_site_or_that_torch_fx_cannot_trace_is_refused() -> None:
    x, y = np.zeros((4, 4), np.float32), np.zeros(4, np.int64)
    with pytest.raises(LockError, match="no Conv2d/Linear -> ReLU"):
        soft_lock(torch.nn.Linear(4, 2), x, y)  # traced by torch.fx: one layer, no site

    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, inputs):
            if inputs.sum() > 0:  # data-dependent control flow: not traceable
                inputs = -inputs
            return self.b(torch.relu(self.a(inputs)))

    with pytest.raises(LockError, match="torch.fx cannot trace Branchy"):
        soft_lock(Branchy(), x, y)
    with pytest.raises(LockError, match="needs a torch.nn.Module, got str"):
        soft_lock("model.pt", x, y)  # type: ignore[arg-type]


def test_a_model_without_a_lock_site_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    with pytest.raises(LockError, match="no Conv2d/Linear -> ReLU"):
        soft_lock(model, np.zeros((4, 4), np.float32), np.zeros(4, np.int64))


def test_mismatched_or_non_finite_data_are_refused() -> None:
    with pytest.raises(LockError, match="equally long: 4 vs 3"):
        soft_lock(digits_mlp(), np.zeros((4, 64), np.float32), np.zeros(3, np.int64))
    bad = np.zeros((4, 64), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(LockError, match="NaN or infinite"):
        soft_lock(digits_mlp(), bad, np.zeros(4, np.int64))


def test_an_out_of_range_offset_is_refused() -> None:
    with pytest.raises(LockError, match="offset_exponent must be between 8 and 14, got 16"):
        soft_lock(digits_mlp(), np.zeros((4, 64), np.float32), np.zeros(4, np.int64), offset_exponent=16)


def test_quantised_variants_refuses_bad_arguments() -> None:
    model = export_torch(digits_mlp(), torch.zeros(2, 64))
    with pytest.raises(LockError, match="needs an onnx.ModelProto, got bytes"):
        quantised_variants(model.SerializeToString(), np.zeros((4, 64), np.float32))
    with pytest.raises(LockError, match="calibration must be a non-empty float batch"):
        quantised_variants(model, np.zeros((0, 64), np.float32))
    with pytest.raises(LockError, match="calibration must be a non-empty float batch"):
        quantised_variants(model, np.zeros((4, 64), np.int64))


def test_evaluate_variants_refuses_mismatched_data() -> None:
    with pytest.raises(LockError, match="equally long: 2 vs 1"):
        evaluate_variants({}, np.zeros((2, 64), np.float32), np.zeros(1, np.int64))


def test_lock_sites_of_the_two_models_and_refused_consumers() -> None:
    nn = torch.nn
    assert (find_lock_site(small_cnn()).producer, find_lock_site(small_cnn()).consumer) == (0, 3)
    assert (find_lock_site(digits_mlp()).producer, find_lock_site(digits_mlp()).consumer) == (0, 2)
    grouped = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(LockError, match="layer 2 \\(Conv2d\\) must have groups=1"):
        find_lock_site(grouped)
    no_bias = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(LockError, match="layer 0 \\(Linear\\) has no bias"):
        find_lock_site(no_bias)
    averaged = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 4, 3))
    with pytest.raises(LockError, match="no Conv2d/Linear -> ReLU"):
        find_lock_site(averaged)
