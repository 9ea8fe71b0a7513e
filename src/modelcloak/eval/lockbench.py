"""`modelcloak bench-lock`: what the lock scheme does to accuracy, weight statistics and load time.

Everything runs the way a deployment would: models are protected with `protect --scheme lock`
to a device enrolled in a TPM (two swtpm instances stand in for two machines; the software device
key is used, and labelled so, where swtpm is missing), loaded through the runtime, and scored on
held-out MNIST digits. Rows per model:

- original: the unprotected ONNX model in onnxruntime;
- authorised device, per lock method: accuracy and whether every output is bit-identical;
- wrong key: a bundle whose lock key the device derives wrongly (an old enrolment's lock key);
- copied to another device: the bundle plus the first device's state on the second TPM
  (refused, with the message), and the same bundle with its device entry relabelled for the
  second device by an attacker who holds the host key (loads, weights destroyed);
- soft lock (`modelcloak.lock.soft`): FP32, FP16, INT8 dynamic and static, for the original and
  the soft-locked model.

Also: the two-sample KS distance between wrong-key and real weights per tensor and method, on the
two MNIST models and on EfficientNet-Lite0's ImageNet weights; and the unlock overhead, load
time of a lock bundle against a seal bundle of the same model, loaded alternately, medians.
"""

from __future__ import annotations

import contextlib
import csv
import os
import secrets
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from rich.console import Console
from rich.progress import Progress

from modelcloak.errors import ModelcloakError
from modelcloak.lock import METHODS, is_lockable, ks_distance, lock_weights, unlock_weights
from modelcloak.lock.layout import SEALED

__all__ = ["AccuracyRow", "KsRow", "LockBench", "OverheadRow", "bench_lock", "write_lock_report"]

WRONG_KEYS = 5


@dataclass(frozen=True)
class AccuracyRow:
    model: str
    variant: str
    accuracy: float | None  # None: refused (see note)
    identical: bool | None  # outputs bit-identical to the original (authorised rows only)
    note: str = ""


@dataclass(frozen=True)
class KsRow:
    model: str
    method: str
    tensor: str
    weights: int
    ks: float
    finite: bool


@dataclass(frozen=True)
class OverheadRow:
    model: str
    weights: int
    kernel: str  # "sealed" (the method), or uniform-shift's unlock kernel ("numpy" or "numba", warm)
    seal_load_s: float
    lock_load_s: float
    unlock_s: float
    overhead: float  # (lock - seal) / seal, wall
    unlock_share: float  # unlock / lock load
    seal_cpu_s: float
    lock_cpu_s: float
    cpu_overhead: float  # (lock - seal) / seal, CPU time of the loading process
    seal_bytes: int
    lock_bytes: int
    size_ratio: float  # lock bundle / seal bundle
    cold_numba_s: float | None  # first locked load with numba in a fresh process (imports numba)


@dataclass
class LockBench:
    accuracy: list[AccuracyRow]
    ks: list[KsRow]
    overhead: list[OverheadRow]
    devices: str  # "swtpm" or "software"
    chance: float


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _mnist_models(seed: int, epochs: int) -> tuple[dict[str, Any], Any]:
    import torch

    from modelcloak.training import train_classifier
    from modelcloak.zoo.mnist import load_mnist, small_cnn

    split = load_mnist()
    nn = torch.nn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    models = {"mnist-cnn": small_cnn(seed=seed), "mnist-mlp": mlp}
    for module in models.values():
        train_classifier(module, split.x_train, split.y_train, epochs=epochs, seed=seed, progress=False)
    return models, split


def _efficientnet() -> onnx.ModelProto:
    """EfficientNet-Lite0 with its ImageNet weights (3.4 M), images -> 1,280-d features, as ONNX."""
    import torch

    from modelcloak.model import export_torch
    from modelcloak.zoo.image import load_efficientnet_lite0

    extractor = load_efficientnet_lite0(224)

    class Features(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = extractor.net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return extractor.features(x)

    return export_torch(Features().eval(), torch.zeros(1, 3, 224, 224))


def _to_onnx(module: Any) -> onnx.ModelProto:
    import torch

    from modelcloak.model import export_torch

    return export_torch(module.eval(), torch.zeros(1, 1, 28, 28))


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


class _Devices:
    """Two enrolled devices, A (authorised) and B (another machine), and A's exported lock key."""

    def __init__(self, folder: Path, prefer_tpm: bool) -> None:
        from modelcloak.keys.device import DeviceLockKey, write_lock_key_file

        self.folder = folder
        self._stack = contextlib.ExitStack()
        self.kind = "swtpm" if prefer_tpm and _swtpm_usable() else "software"
        self.a = self._enrol("a")
        self.b = self._enrol("b")
        root = self.a.export_lock_key()
        try:
            self.a_lock_file = write_lock_key_file(folder / "a.lock", root, self.a.identity)
        finally:
            root.close()
        self.a_handle = lambda: DeviceLockKey.from_file(self.a_lock_file)

    def _enrol(self, name: str) -> Any:
        state = self.folder / f"device-{name}"
        if self.kind == "swtpm":
            from modelcloak.keys.swtpm import SwTpm
            from modelcloak.keys.tpm import TpmDeviceKey, enroll_device

            tpm = self._stack.enter_context(SwTpm(self.folder / f"tpm-{name}"))
            setattr(self, f"tcti_{name}", tpm.tcti)
            enroll_device(state, tcti=tpm.tcti)
            return TpmDeviceKey(state, tcti=tpm.tcti)
        from modelcloak.keys.device import SoftwareDeviceKey, enroll_software_device

        machine = self.folder / f"machine-{name}"
        (machine / "etc").mkdir(parents=True)
        (machine / "etc" / "machine-id").write_text(secrets.token_hex(16) + "\n")
        enroll_software_device(state, identity_root=machine)
        return SoftwareDeviceKey(state, identity_root=machine)

    def a_state_on_b(self) -> Any:
        """Device A's state directory on machine B: what copying the disk to another machine gives."""
        if self.kind == "swtpm":
            from modelcloak.keys.tpm import TpmDeviceKey

            return TpmDeviceKey(self.a.state_dir, tcti=self.tcti_b)
        from modelcloak.keys.device import SoftwareDeviceKey

        return SoftwareDeviceKey(self.a.state_dir, identity_root=self.b.identity_root)

    def a_spec(self) -> dict[str, str]:
        """How another process opens device A's key (modelcloak.eval.locktiming)."""
        if self.kind == "swtpm":
            return {"kind": "tpm", "state": str(self.a.state_dir), "tcti": self.tcti_a}
        return {"kind": "software", "state": str(self.a.state_dir), "identity_root": str(self.a.identity_root)}

    def close(self) -> None:
        self._stack.close()


def _swtpm_usable() -> bool:
    if shutil.which("swtpm") is None:
        return False
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def bench_lock(
    *,
    repeats: int = 7,
    epochs: int = 3,
    soft: bool = True,
    efficientnet: bool = True,
    mnist: bool = True,
    prefer_tpm: bool = True,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
    synthetic_weights: int = 100_000_000,
    overhead_only: bool = False,
) -> LockBench:
    """Run every measurement of the lock scheme (see the module docstring); nothing is written.

    `synthetic_weights` adds a float32 MLP of about that many weights to the load timing (0: none);
    `overhead_only` skips the accuracy, soft-lock and KS rows; `mnist=False` leaves the two MNIST
    models out (no training).
    """
    if repeats < 1 or epochs < 1:
        raise ModelcloakError("repeats and epochs must be at least 1")
    import torch

    from modelcloak.keys import generate_key_file

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on shared machines; the timings below use onnxruntime
    folder = Path(tempfile.mkdtemp(prefix="modelcloak-bench-lock-"))
    try:
        with _progress(progress, console) as advance:
            models: dict[str, Any] = {}
            split: Any = None
            if mnist:
                advance("training the MNIST models")
                models, split = _mnist_models(seed, epochs)
            host = generate_key_file(folder / "host.key")
            advance("enrolling two devices")
            devices = _Devices(folder, prefer_tpm)
            accuracy: list[AccuracyRow] = []
            ks: list[KsRow] = []
            onnx_models: dict[str, onnx.ModelProto] = {}
            try:
                for name, module in models.items():
                    onnx_models[name] = _to_onnx(module)
                    if not overhead_only:
                        accuracy += _hard_lock_rows(name, onnx_models[name], split, host, devices, folder, advance)
                        ks += _ks_rows(name, onnx_models[name])
                if soft and not overhead_only:
                    for name, module in models.items():
                        advance(f"{name}: soft lock fine-tune and quantisation")
                        accuracy += _soft_rows(name, module, onnx_models[name], split, seed)
                if efficientnet:
                    advance("EfficientNet-Lite0: export")
                    onnx_models["efficientnet-lite0"] = _efficientnet()
                    if not overhead_only:
                        ks += _ks_rows("efficientnet-lite0", onnx_models["efficientnet-lite0"])
                overhead: list[OverheadRow] = []
                for name, model in onnx_models.items():
                    advance(f"{name}: seal vs lock load time")
                    overhead += _overhead(name, model, host, devices, folder, repeats)
                onnx_models.clear()
                if synthetic_weights:
                    millions = synthetic_weights >= 1e6
                    size = f"{synthetic_weights / 1e6:.0f}M" if millions else f"{synthetic_weights // 1000}k"
                    label = f"synthetic-mlp-{size}"
                    advance(f"{label}: build, seal and lock")
                    overhead += _overhead(label, synthetic_mlp(synthetic_weights), host, devices, folder, repeats)
            finally:
                devices.close()
        return LockBench(accuracy, ks, overhead, devices.kind, chance=1 / 10)
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _progress(enabled: bool, console: Console | None) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda _description: None
        return
    with Progress(console=console or Console(stderr=True), transient=True) as bar:
        task = bar.add_task("bench-lock", total=None)
        yield lambda description: bar.update(task, description=description, advance=1)


def _predict(session: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    outputs = [next(iter(session.run(x[i : i + batch]).values())) for i in range(0, len(x), batch)]
    return np.concatenate(outputs)


def _score(logits: np.ndarray, y: np.ndarray) -> float:
    finite = np.isfinite(logits).all(axis=1)
    return float(((logits.argmax(axis=1) == y) & finite).mean())


def _plain_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)])


def _hard_lock_rows(
    name: str, model: onnx.ModelProto, split: Any, host: Any, devices: _Devices, folder: Path, advance: Any
) -> list[AccuracyRow]:
    from modelcloak.inference import load
    from modelcloak.keys.device import DeviceLockKey
    from modelcloak.options import LockOptions
    from modelcloak.protector import protect

    x, y = split.x_test, split.y_test
    reference = _plain_logits(model, x)
    rows = [AccuracyRow(name, "original", _score(reference, y), None)]

    def scored(bundle: Path, device_key: Any) -> np.ndarray:
        with load(bundle, key=host, device_key=device_key) as session:
            return _predict(session, x)

    def attacked(variant: str, bundle: Path, device_key: Any) -> AccuracyRow:
        """An attacker's load: its accuracy, or "refused" with the message (`sealed` refuses)."""
        try:
            return AccuracyRow(name, variant, _score(scored(bundle, device_key), y), None)
        except ModelcloakError as exc:
            return AccuracyRow(name, variant, None, None, f"refused: {exc}")

    for method in (SEALED, *METHODS):
        advance(f"{name}: {method} on the authorised device")
        bundle = folder / f"{name}-{method}.mcb"
        protect(model, bundle, key=host, scheme="lock", lock=LockOptions([devices.a_handle()], method))
        logits = scored(bundle, devices.a)
        rows.append(AccuracyRow(name, f"authorised device ({method})", _score(logits, y), _same(logits, reference)))

        # Relabelled entry: the attacker copies the bundle to device B and rewrites the entry for B.
        relabelled = DeviceLockKey.from_file(devices.a_lock_file)
        relabelled.fingerprint = devices.b.identity.fingerprint
        forged = folder / f"{name}-{method}-forged.mcb"
        protect(model, forged, key=host, scheme="lock", lock=LockOptions([relabelled], method))
        rows.append(attacked(f"copied to device B, entry relabelled ({method})", forged, devices.b))

    advance(f"{name}: wrong key and copied state")
    # One wrong key is one draw: a destroyed model often answers mostly one class, and scores that
    # class's share of the test set. The median over several keys is the figure to compare.
    for method in (SEALED, "uniform-shift"):
        wrong_rows = []
        for attempt in range(WRONG_KEYS):
            stale = DeviceLockKey(secrets.token_bytes(32), devices.a.identity.fingerprint)  # an old enrolment's key
            wrong = folder / f"{name}-{method}-wrong-{attempt}.mcb"
            protect(model, wrong, key=host, scheme="lock", lock=LockOptions([stale], method))
            wrong_rows.append(attacked(f"wrong key ({method})", wrong, devices.a))
        rows.append(_wrong_key_row(wrong_rows))
    try:
        scored(folder / f"{name}-uniform-shift.mcb", devices.a_state_on_b())
        rows.append(AccuracyRow(name, "copied to device B with A's state", None, None, "NOT refused"))
    except ModelcloakError as exc:
        rows.append(AccuracyRow(name, "copied to device B with A's state", None, None, f"refused: {exc}"))
    return rows


def _wrong_key_row(attempts: list[AccuracyRow]) -> AccuracyRow:
    """One row for several wrong keys: "refused" only if every key was, else the median score."""
    first = attempts[0]
    scores = [r.accuracy for r in attempts if r.accuracy is not None]
    refused = len(attempts) - len(scores)
    if not scores:
        return AccuracyRow(first.model, first.variant, None, None, f"all {len(attempts)} random keys {first.note}")
    spread = f"median of {len(scores)} random keys; range {100 * min(scores):.1f}-{100 * max(scores):.1f}%"
    if refused:
        spread += f"; {refused} refused"
    return AccuracyRow(first.model, first.variant, statistics.median(scores), None, spread)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def _soft_rows(name: str, module: Any, model: onnx.ModelProto, split: Any, seed: int) -> list[AccuracyRow]:
    from modelcloak.lock.soft import evaluate_variants, quantised_variants, soft_lock

    calibration = split.x_train[:256]
    rows = []
    for label, onnx_model in (
        ("original", model),
        ("soft-locked", _to_onnx(soft_lock(module, split.x_train, split.y_train, seed=seed, progress=False))),
    ):
        scores = evaluate_variants(quantised_variants(onnx_model, calibration), split.x_test, split.y_test)
        rows += [AccuracyRow(name, f"{label} {variant}", value, None) for variant, value in scores.items()]
    return rows


def _ks_rows(name: str, model: onnx.ModelProto) -> list[KsRow]:
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    arrays = {k: v for k, v in arrays.items() if is_lockable(v)}
    salt = secrets.token_bytes(16)
    rows = []
    for method in METHODS:
        locked, params = lock_weights(arrays, secrets.token_bytes(32), salt, method=method)
        wrong = unlock_weights(locked, secrets.token_bytes(32), salt, params)
        for tensor, real in arrays.items():
            got = wrong[tensor].reshape(-1)
            finite = bool(np.isfinite(got).all())
            distance = ks_distance(got[np.isfinite(got)], real.reshape(-1)) if finite else 1.0
            rows.append(KsRow(name, method, tensor, int(real.size), distance, finite))
    return rows


def _overhead(
    name: str, model: onnx.ModelProto, host: Any, devices: _Devices, folder: Path, repeats: int
) -> list[OverheadRow]:
    """Seal vs lock load time, measured in a child process without torch (modelcloak.eval.locktiming)."""
    import json
    import subprocess
    import sys

    from modelcloak.eval.locktiming import CODE_KERNELS, CODES_SEAL, ESAPI_KEY, FRESH_KEY
    from modelcloak.lock.kernel import _numba_installed
    from modelcloak.options import LockOptions
    from modelcloak.protector import protect

    sealed, locked = folder / f"{name}-timing-seal.mcb", folder / f"{name}-timing-lock.mcb"
    locked_sealed = folder / f"{name}-timing-lock-sealed.mcb"
    protect(model, sealed, key=host, scheme="seal")
    protect(model, locked_sealed, key=host, scheme="lock", lock=LockOptions([devices.a_handle()], "sealed"))
    protect(model, locked, key=host, scheme="lock", lock=LockOptions([devices.a_handle()], "uniform-shift"))
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    del model  # the 100M-weight model is 400 MB; the child needs the memory more
    # "sealed" (the default method), then uniform-shift with the fastest kernel installed.
    # "sealed-fresh-key": the sealed bundle loaded with a new device key object each time (no
    # TPM contexts kept from an earlier load: what a process that loads one model pays).
    # "sealed-esapi" (TPM devices only): the same with every unseal through ESAPI, the pre-round-6 path.
    kernels = ["sealed", FRESH_KEY, "numba" if _numba_installed() else "numpy"]
    paths = {"sealed": locked_sealed, FRESH_KEY: locked_sealed, kernels[2]: locked}
    if devices.kind == "swtpm":
        kernels.append(ESAPI_KEY)
        paths[ESAPI_KEY] = locked_sealed
    spec = {
        "seal": str(sealed),
        "lock": str(locked),
        "locks": {k: str(v) for k, v in paths.items()},
        "key": str(host.path),
        "repeats": repeats,
        "kernels": kernels,
        "device": devices.a_spec(),
    }
    spec_path = folder / f"{name}-timing.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "modelcloak.eval.locktiming", str(spec_path)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "MODELCLOAK_LOCK_KERNEL"},
    )
    if done.returncode != 0:
        raise ModelcloakError(f"the timing process failed for {name}: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["torch_imported"]:
        raise ModelcloakError("the timing process imported torch; its timings would not be those of a device")
    rows = []
    for kernel in kernels:
        # Each row against the seal loads timed in its own phase (modelcloak.eval.locktiming).
        seal = result[CODES_SEAL] if kernel in CODE_KERNELS else result["seal"]
        sizes = sealed.stat().st_size, paths[kernel].stat().st_size
        lock = result[f"lock-{kernel}"]
        cold = result.get("cold_numba", {}).get("wall") if kernel == "numba" else None
        rows.append(
            OverheadRow(
                name,
                weights,
                kernel,
                seal["wall"],
                lock["wall"],
                lock["unlock"],
                (lock["wall"] - seal["wall"]) / seal["wall"],
                lock["unlock"] / lock["wall"],
                seal["cpu"],
                lock["cpu"],
                (lock["cpu"] - seal["cpu"]) / seal["cpu"],
                sizes[0],
                sizes[1],
                sizes[1] / sizes[0],
                cold,
            )
        )
    for path in (sealed, locked, locked_sealed):
        path.unlink()
    return rows


def synthetic_mlp(weights: int, *, seed: int = 0) -> onnx.ModelProto:
    """A float32 MLP of about `weights` weights (square MatMuls of width <= 5000, biases, ReLUs), N(0, 0.02)."""
    import math

    from onnx import TensorProto, helper

    width = min(5000, max(16, math.isqrt(weights)))
    layers = max(1, round(weights / (width * width + width)))
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width), dtype=np.float32) * np.float32(0.02)).astype(np.float32)
        b = (rng.standard_normal(width, dtype=np.float32) * np.float32(0.02)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"h{i}"]),
        ]
        current = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "synthetic-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def write_lock_report(bench: LockBench, out_dir: Path, *, command: str = "modelcloak bench-lock") -> dict[str, Path]:
    """lock.md, lock-accuracy.csv, lock-ks.csv, lock-overhead.csv and lock.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "md": out_dir / "lock.md",
        "accuracy": out_dir / "lock-accuracy.csv",
        "ks": out_dir / "lock-ks.csv",
        "overhead": out_dir / "lock-overhead.csv",
        "png": out_dir / "lock.png",
    }
    for key, rows in (("accuracy", bench.accuracy), ("ks", bench.ks), ("overhead", bench.overhead)):
        if not rows:
            paths.pop(key)
            continue
        with paths[key].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    paths["md"].write_text(_markdown(bench, command))
    _plot(bench, paths["png"])
    return paths


def _pct(value: float | None) -> str:
    return "refused" if value is None else f"{100 * value:.1f}%"


def _markdown(bench: LockBench, command: str) -> str:
    lines = [
        "# bench-lock",
        "",
        f"Command: `{command}`. Devices: {bench.devices}. Machine: {os.uname().machine}, {os.cpu_count()} cores.",
        f"Chance: {100 * bench.chance:.0f}% (10 balanced classes, {len({r.model for r in bench.accuracy})} models).",
        "",
    ]
    if bench.accuracy:
        lines += ["## Accuracy on held-out MNIST digits", "", "| model | variant | accuracy | bit-identical | note |"]
        lines += ["|---|---|---:|---|---|"]
    for r in bench.accuracy:
        identical = "" if r.identical is None else ("yes" if r.identical else "NO")
        lines.append(f"| {r.model} | {r.variant} | {_pct(r.accuracy)} | {identical} | {r.note} |")
    if bench.ks:
        lines += ["", "## Wrong-key weights against real weights (two-sample KS distance per tensor)", ""]
        lines += [
            "| model | method | tensors | weights | KS median | KS max | all finite |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
    for (model, method), rows in _groups(bench.ks).items():
        values = [r.ks for r in rows]
        lines.append(
            f"| {model} | {method} | {len(rows)} | {sum(r.weights for r in rows):,} | {statistics.median(values):.4f} "
            f"| {max(values):.4f} | {'yes' if all(r.finite for r in rows) else 'no'} |"
        )
    lines += ["", "## Load time and size: seal vs lock (medians of shuffled loads, in a process without torch)", ""]
    lines += [
        "| model | weights | method / unlock kernel | seal load ms | lock load ms | overhead (wall) | unlock ms "
        "| seal CPU ms | lock CPU ms | overhead (CPU) | seal MB | lock MB | size ratio | cold first load, numba |"
    ]
    lines += ["|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in bench.overhead:
        cold = "" if r.cold_numba_s is None else f"{1000 * r.cold_numba_s:.0f} ms"
        lines.append(
            f"| {r.model} | {r.weights:,} | {r.kernel} | {1000 * r.seal_load_s:.1f} | {1000 * r.lock_load_s:.1f} "
            f"| {100 * r.overhead:+.1f}% | {1000 * r.unlock_s:.1f} | {1000 * r.seal_cpu_s:.1f} "
            f"| {1000 * r.lock_cpu_s:.1f} | {100 * r.cpu_overhead:+.1f}% | {r.seal_bytes / 1e6:.1f} "
            f"| {r.lock_bytes / 1e6:.1f} | {r.size_ratio:.2f}x | {cold} |"
        )
    return "\n".join(lines) + "\n"


def _groups(rows: list[KsRow]) -> dict[tuple[str, str], list[KsRow]]:
    groups: dict[tuple[str, str], list[KsRow]] = {}
    for row in rows:
        groups.setdefault((row.model, row.method), []).append(row)
    return groups


def _plot(bench: LockBench, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r.model for r in bench.accuracy})
    panels = len(models) + bool(bench.ks) + bool(bench.overhead)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 6), squeeze=False)
    axes = list(axes[0])
    for ax, model in zip(axes, models):
        rows = [r for r in bench.accuracy if r.model == model and r.accuracy is not None]
        ax.barh([r.variant for r in rows], [100 * r.accuracy for r in rows], color="tab:blue")
        ax.axvline(100 * bench.chance, color="tab:red", linestyle="--", label="chance")
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
        ax.set_title(model)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(loc="lower right")
    axes = axes[len(models) :]
    if bench.ks:
        ax = axes.pop(0)
        groups = _groups(bench.ks)
        labels = [f"{model}\n{method}" for model, method in groups]
        ax.boxplot([[r.ks for r in rows] for rows in groups.values()], orientation="horizontal", tick_labels=labels)
        ax.set_xscale("symlog", linthresh=1e-3)  # permutation's KS is exactly 0
        ax.set_xlabel("KS distance per tensor")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title("do wrong-key weights look real?")
    if bench.overhead:
        ax = axes.pop(0)
        labels = [f"{r.model}\n{r.kernel}" for r in bench.overhead]
        y = np.arange(len(labels))
        ax.barh(y - 0.2, [r.seal_load_s for r in bench.overhead], 0.4, label="seal load", color="tab:gray")
        ax.barh(y + 0.2, [r.lock_load_s for r in bench.overhead], 0.4, label="lock load", color="tab:orange")
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("load time, s (median, wall)")
        ax.invert_yaxis()
        ax.legend(loc="lower right")
        ax.set_title("what unlocking adds to a load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
