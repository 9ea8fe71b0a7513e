"""Where a locked EfficientNet-Lite0 load's extra CPU goes: seal vs lock with a TPM, ESAPI and software key.

    PYTHONPATH=src python benchmarks/bench_lock_cpu_parts.py --repeats 40

The parent exports EfficientNet-Lite0 (torch), seals it and locks it (`sealed` method) to a swtpm
device and to a software device, then a child process without torch loads the four variants
("seal", "lock-tpm" with the direct unseal, "lock-esapi" with `TpmDeviceKey(direct=False)`,
"lock-soft" with a software device key) in a shuffled order each repeat and prints medians of
this process's CPU per load, of onnxruntime's session build (CPU of all threads while it runs)
and of the rest ("total-build": everything modelcloak does, including the device-key thread).
onnxruntime's build varies by several ms from load to load on a busy machine (its worker threads
spin), so "total-build" is the steadier column for the lock's own cost. Needs swtpm.

`--before REV` adds "seal@REV" and "lock-tpm@REV": the same loads with `runtime/copywatch.py`,
`hygiene.release_range` and `hygiene._libc` taken from git revision REV, interleaved with the
others (issue 19, round 6b).
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def prepare(folder: Path, repeats: int, before: str | None = None) -> None:
    from modelcloak.eval.lockbench import _Devices, _efficientnet
    from modelcloak.keys import generate_key_file
    from modelcloak.keys.device import DeviceLockKey, SoftwareDeviceKey, enroll_software_device, write_lock_key_file
    from modelcloak.options import LockOptions
    from modelcloak.protector import protect

    model = _efficientnet()
    host = generate_key_file(folder / "host.key")
    devices = _Devices(folder, prefer_tpm=True)
    if devices.kind != "swtpm":
        raise SystemExit("needs swtpm and tpm2-pytss")
    machine = folder / "machine-s"
    (machine / "etc").mkdir(parents=True)
    (machine / "etc" / "machine-id").write_text(secrets.token_hex(16) + "\n")
    enroll_software_device(folder / "device-s", identity_root=machine)
    soft = SoftwareDeviceKey(folder / "device-s", identity_root=machine)
    root = soft.export_lock_key()
    try:
        soft_lock = write_lock_key_file(folder / "s.lock", root, soft.identity)
    finally:
        root.close()
    protect(model, folder / "seal.mcb", key=host, scheme="seal")
    sealed = LockOptions([devices.a_handle()], "sealed")
    protect(model, folder / "lock-tpm.mcb", key=host, scheme="lock", lock=sealed)
    soft_sealed = LockOptions([DeviceLockKey.from_file(soft_lock)], "sealed")
    protect(model, folder / "lock-soft.mcb", key=host, scheme="lock", lock=soft_sealed)
    spec = {"folder": str(folder), "key": str(host.path), "tpm": devices.a_spec(), "repeats": repeats}
    spec["soft"] = {"state": str(folder / "device-s"), "root": str(machine)}
    if before:
        spec["before"] = before
        for name in ("runtime/copywatch.py", "hygiene.py"):
            source = subprocess.run(
                ["git", "show", f"{before}:src/modelcloak/{name}"], check=True, capture_output=True, text=True
            )
            (folder / name.replace("/", "-")).write_text(source.stdout)
    (folder / "spec.json").write_text(json.dumps(spec))
    try:
        subprocess.run([sys.executable, __file__, "--child", str(folder / "spec.json")], check=True)
    finally:
        devices.close()


def child(spec_path: Path) -> None:
    import modelcloak.runtime.session as session_module
    from modelcloak.inference import load
    from modelcloak.keys import KeyFile
    from modelcloak.keys.device import SoftwareDeviceKey
    from modelcloak.keys.tpm import TpmDeviceKey

    spec = json.loads(spec_path.read_text())
    folder = Path(spec["folder"])
    host = KeyFile(spec["key"])
    tpm = TpmDeviceKey(spec["tpm"]["state"], tcti=spec["tpm"]["tcti"])
    esapi = TpmDeviceKey(spec["tpm"]["state"], tcti=spec["tpm"]["tcti"], direct=False)
    soft = SoftwareDeviceKey(spec["soft"]["state"], identity_root=Path(spec["soft"]["root"]))
    build: list[float] = []
    real_backend = session_module.OrtBackend

    def timed_backend(*args: Any, **kwargs: Any) -> Any:
        mark = time.process_time()
        try:
            return real_backend(*args, **kwargs)
        finally:
            build.append(time.process_time() - mark)

    session_module.OrtBackend = timed_backend  # type: ignore[misc]
    variants = {
        "seal": lambda: load(str(folder / "seal.mcb"), key=host),
        "lock-tpm": lambda: load(str(folder / "lock-tpm.mcb"), key=host, device_key=tpm),
        "lock-esapi": lambda: load(str(folder / "lock-tpm.mcb"), key=host, device_key=esapi),
        "lock-soft": lambda: load(str(folder / "lock-soft.mcb"), key=host, device_key=soft),
    }
    if spec.get("before"):
        variants.update(_before_variants(folder, spec["before"], variants))
    for make in variants.values():  # warm-up
        make().close()
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    shuffler = random.Random(0)
    for _ in range(int(spec["repeats"])):
        order = list(variants)
        shuffler.shuffle(order)
        for name in order:
            build.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            session = variants[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            session.close()
            samples[name].append((wall, cpu, build[0]))
    print(f"{'variant':16s}  {'wall ms':>8s}  {'CPU ms':>8s}  {'build CPU':>9s}  {'total-build':>11s}")
    for name, runs in samples.items():
        wall = 1e3 * statistics.median(r[0] for r in runs)
        cpu = 1e3 * statistics.median(r[1] for r in runs)
        built = 1e3 * statistics.median(r[2] for r in runs)
        rest = 1e3 * statistics.median(r[1] - r[2] for r in runs)
        print(f"{name:16s}  {wall:8.2f}  {cpu:8.2f}  {built:9.2f}  {rest:11.2f}   (n={len(runs)})")


def _module_from(path: Path, name: str) -> Any:
    import importlib.util

    loaded = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loaded)  # type: ignore[arg-type]
    loaded.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _before_variants(folder: Path, revision: str, variants: dict[str, Any]) -> dict[str, Any]:
    """The variants "seal@REV" and "lock-tpm@REV": each load runs with REV's copy-watch and page release."""
    from modelcloak import hygiene
    from modelcloak.runtime import copywatch

    old_watch = _module_from(folder / "runtime-copywatch.py", "copywatch_before").RegionRelease
    old_hygiene = _module_from(folder / "hygiene.py", "hygiene_before")
    old_release, old_libc = old_hygiene.release_range, old_hygiene._libc

    def with_before(make: Any) -> Any:
        def run() -> Any:
            new_watch, new_release, new_libc = copywatch.RegionRelease, hygiene.release_range, hygiene._libc
            copywatch.RegionRelease, hygiene.release_range, hygiene._libc = old_watch, old_release, old_libc  # type: ignore[misc]
            try:
                return make()
            finally:
                copywatch.RegionRelease, hygiene.release_range, hygiene._libc = new_watch, new_release, new_libc  # type: ignore[misc]

        return run

    return {f"{name}@{revision}": with_before(variants[name]) for name in ("seal", "lock-tpm")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--before", help="also time the loads with copywatch and release_range of this git revision")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    with tempfile.TemporaryDirectory(prefix="modelcloak-bench-lock-parts-") as folder:
        prepare(Path(folder), args.repeats, args.before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
