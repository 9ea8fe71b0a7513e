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
import time
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
    seal_load_s: float
    lock_load_s: float
    unlock_s: float
    overhead: float  # (lock - seal) / seal
    unlock_share: float  # unlock / lock load


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
    prefer_tpm: bool = True,
    seed: int = 0,
    progress: bool = True,
    console: Console | None = None,
) -> LockBench:
    """Run every measurement of the lock scheme (see the module docstring); nothing is written."""
    if repeats < 1 or epochs < 1:
        raise ModelcloakError("repeats and epochs must be at least 1")
    import torch

    from modelcloak.keys import generate_key_file

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on shared machines; the timings below use onnxruntime
    folder = Path(tempfile.mkdtemp(prefix="modelcloak-bench-lock-"))
    try:
        with _progress(progress, console) as advance:
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
                    accuracy += _hard_lock_rows(name, onnx_models[name], split, host, devices, folder, advance)
                    ks += _ks_rows(name, onnx_models[name])
                if soft:
                    for name, module in models.items():
                        advance(f"{name}: soft lock fine-tune and quantisation")
                        accuracy += _soft_rows(name, module, onnx_models[name], split, seed)
                if efficientnet:
                    advance("EfficientNet-Lite0: export")
                    onnx_models["efficientnet-lite0"] = _efficientnet()
                    ks += _ks_rows("efficientnet-lite0", onnx_models["efficientnet-lite0"])
                overhead = []
                for name, model in onnx_models.items():
                    advance(f"{name}: seal vs lock load time")
                    overhead.append(_overhead(name, model, host, devices, folder, repeats))
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

    for method in METHODS:
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
        rows.append(
            AccuracyRow(
                name, f"copied to device B, entry relabelled ({method})", _score(scored(forged, devices.b), y), None
            )
        )

    advance(f"{name}: wrong key and copied state")
    # One wrong key is one draw: a destroyed model often answers mostly one class, and scores that
    # class's share of the test set. The median over several keys is the figure to compare.
    wrong_scores = []
    for attempt in range(WRONG_KEYS):
        stale = DeviceLockKey(secrets.token_bytes(32), devices.a.identity.fingerprint)  # an old enrolment's key
        wrong = folder / f"{name}-wrong-{attempt}.mcb"
        protect(model, wrong, key=host, scheme="lock", lock=[stale])
        wrong_scores.append(_score(scored(wrong, devices.a), y))
    spread = f"median of {WRONG_KEYS} random keys; range {100 * min(wrong_scores):.1f}-{100 * max(wrong_scores):.1f}%"
    rows.append(AccuracyRow(name, "wrong key (uniform-shift)", statistics.median(wrong_scores), None, spread))
    try:
        scored(folder / f"{name}-uniform-shift.mcb", devices.a_state_on_b())
        rows.append(AccuracyRow(name, "copied to device B with A's state", None, None, "NOT refused"))
    except ModelcloakError as exc:
        rows.append(AccuracyRow(name, "copied to device B with A's state", None, None, f"refused: {exc}"))
    return rows


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
) -> OverheadRow:
    from modelcloak.inference import load
    from modelcloak.protector import protect

    sealed, locked = folder / f"{name}-timing-seal.mcb", folder / f"{name}-timing-lock.mcb"
    protect(model, sealed, key=host, scheme="seal")
    protect(model, locked, key=host, scheme="lock", lock=[devices.a_handle()])
    seal_s, lock_s, unlock_s = [], [], []
    for _ in range(repeats):  # alternate, so drift on a shared machine hits both alike
        start = time.perf_counter()
        with load(sealed, key=host):
            seal_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        with load(locked, key=host, device_key=devices.a) as session:
            lock_s.append(time.perf_counter() - start)
            unlock_s.append(session.report.seconds["unlock"])
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    seal, lock, unlock = (statistics.median(v) for v in (seal_s, lock_s, unlock_s))
    return OverheadRow(name, weights, seal, lock, unlock, (lock - seal) / seal, unlock / lock)


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
        "## Accuracy on held-out MNIST digits",
        "",
        "| model | variant | accuracy | bit-identical | note |",
        "|---|---|---:|---|---|",
    ]
    for r in bench.accuracy:
        identical = "" if r.identical is None else ("yes" if r.identical else "NO")
        lines.append(f"| {r.model} | {r.variant} | {_pct(r.accuracy)} | {identical} | {r.note} |")
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
    lines += ["", "## Unlock overhead (medians of alternating loads)", ""]
    lines += ["| model | weights | seal load ms | lock load ms | unlock ms | overhead | unlock share |"]
    lines += ["|---|---:|---:|---:|---:|---:|---:|"]
    for r in bench.overhead:
        lines.append(
            f"| {r.model} | {r.weights:,} | {1000 * r.seal_load_s:.1f} | {1000 * r.lock_load_s:.1f} "
            f"| {1000 * r.unlock_s:.1f} | {100 * r.overhead:+.1f}% | {100 * r.unlock_share:.1f}% |"
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
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6 * (len(models) + 1), 6))
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
    ax = axes[-1]
    groups = _groups(bench.ks)
    labels = [f"{model}\n{method}" for model, method in groups]
    ax.boxplot([[r.ks for r in rows] for rows in groups.values()], orientation="horizontal", tick_labels=labels)
    ax.set_xscale("symlog", linthresh=1e-3)  # permutation's KS is exactly 0
    ax.set_xlabel("KS distance per tensor")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("do wrong-key weights look real?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
