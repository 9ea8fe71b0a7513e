"""bench-lock's load timing, run in a process of its own that never imports torch.

The parent (modelcloak.eval.lockbench) trains and exports models with torch, which starts
threads and maps hundreds of MB; timing loads in that process would slow both sides alike and
make the lock's share look smaller than on a device. Here one process loads the seal bundle and
the lock bundles in a shuffled order each repeat, records wall and CPU time per load, and prints
medians as JSON. It does so in two phases, each with its own seal baseline ("seal", then
"seal-codes"): the `sealed` rows, then uniform-shift's numpy/numba kernels, whose worker threads
would otherwise bill the loads that follow them.

    python -m modelcloak.eval.locktiming SPEC.json

SPEC: {"seal": path, "lock": path, "key": host key file, "repeats": n, "kernels": [...],
"device": {"kind": "tpm", "state": dir, "tcti": str} or {"kind": "software", "state": dir,
"identity_root": dir}}. Every locked load reuses one device key object, except the kernel
"sealed-fresh-key" (the sealed bundle with a new device key object per load: the TPM's full
path), and "sealed-esapi" (one device key object whose unseals run all through ESAPI). The
first locked load with the numba kernel is timed on its own ("cold"): it includes importing numba
and loading its compiled code from the cache.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["CODES_SEAL", "CODE_KERNELS", "ESAPI_KEY", "FRESH_KEY", "main", "time_loads"]

FRESH_KEY = "sealed-fresh-key"
# The sealed bundle with a device key whose unseal runs all through ESAPI (libtss2's own session
# crypto, every load the full path): the TPM cost before round 6, measured in the same run.
ESAPI_KEY = "sealed-esapi"
CODE_KERNELS = ("numpy", "numba")  # uniform-shift's unlock kernels
CODES_SEAL = "seal-codes"  # the seal baseline timed beside them


def _device_key(spec: dict[str, Any], *, direct: bool = True) -> Any:
    if spec["kind"] == "tpm":
        from modelcloak.keys.tpm import TpmDeviceKey

        return TpmDeviceKey(spec["state"], tcti=spec.get("tcti"), direct=direct)
    from modelcloak.keys.device import SoftwareDeviceKey

    return SoftwareDeviceKey(spec["state"], identity_root=Path(spec["identity_root"]))


def _timed(load: Any, bundle: str, **kwargs: Any) -> tuple[float, float, float]:
    """(wall s, CPU s, unlock s) of one load, session closed outside the timing."""
    wall, cpu = time.perf_counter(), time.process_time()
    session = load(bundle, **kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    unlock = session.report.seconds.get("unlock", 0.0)
    session.close()
    return wall, cpu, unlock


def time_loads(spec: dict[str, Any]) -> dict[str, Any]:
    from modelcloak.inference import load
    from modelcloak.keys import KeyFile

    host = KeyFile(spec["key"])
    device = _device_key(spec["device"])
    esapi_device = _device_key(spec["device"], direct=False) if ESAPI_KEY in spec.get("kernels", []) else None
    kernels = list(spec.get("kernels", ["numpy"]))
    # One lock bundle per row: "sealed" is its own bundle; numpy/numba unlock the uniform-shift one.
    locks = dict(spec.get("locks") or {k: spec["lock"] for k in kernels})
    _timed(load, spec["seal"], key=host)  # warm-up: imports onnxruntime, fills the page cache
    result: dict[str, Any] = {"torch_imported": "torch" in sys.modules}
    # Two phases, each with its own interleaved seal baseline: the `sealed` rows first, then the
    # uniform-shift kernels. numba's worker threads spin on after its loads and would bill whatever
    # load comes next, so none of them runs before the `sealed` rows are done.
    codes = [k for k in kernels if k in CODE_KERNELS]
    for baseline, group in (("seal", [k for k in kernels if k not in CODE_KERNELS]), (CODES_SEAL, codes)):
        if not group:
            continue
        if "numba" in group:
            os.environ["MODELCLOAK_LOCK_KERNEL"] = "numba"
            wall, cpu, unlock = _timed(load, locks["numba"], key=host, device_key=device)
            result["cold_numba"] = {"wall": wall, "cpu": cpu, "unlock": unlock}
        variants = [baseline, *(f"lock-{k}" for k in group)]
        samples: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
        shuffler = random.Random(0)
        for _ in range(int(spec["repeats"])):
            # A fresh random order each repeat (seeded): drift hits all, and no variant always
            # follows the same one (rotating kept each variant's neighbour fixed).
            order = list(variants)
            shuffler.shuffle(order)
            for variant in order:
                if variant == baseline:
                    samples[variant].append(_timed(load, spec["seal"], key=host))
                    continue
                kernel = variant.removeprefix("lock-")
                if kernel in CODE_KERNELS:
                    os.environ["MODELCLOAK_LOCK_KERNEL"] = kernel
                # "sealed-fresh-key": a device key object made for this load alone, as a process that
                # loads one model has; the others reuse one, as a server does (the TPM's saved contexts).
                key = _device_key(spec["device"]) if kernel == FRESH_KEY else device
                if kernel == ESAPI_KEY:
                    key = esapi_device
                samples[variant].append(_timed(load, locks[kernel], key=host, device_key=key))
        for variant, runs in samples.items():
            result[variant] = {
                "wall": statistics.median(r[0] for r in runs),
                "cpu": statistics.median(r[1] for r in runs),
                "unlock": statistics.median(r[2] for r in runs),
                "walls": [r[0] for r in runs],
            }
    result["torch_imported"] = result["torch_imported"] or "torch" in sys.modules
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    print(json.dumps(time_loads(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
