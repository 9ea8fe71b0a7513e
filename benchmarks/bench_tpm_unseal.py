"""CPU and wall time of one TPM device-key unseal against swtpm, and against an older tpm.py side by side.

    git show 802d4a9:src/modelcloak/keys/tpm.py > /tmp/tpm_before.py   # round 4/5: all ESAPI
    PYTHONPATH=src python benchmarks/bench_tpm_unseal.py --repeats 40 --before /tmp/tpm_before.py

One process, one swtpm, two enrolments (without and with a PCR policy). Each repeat runs every
variant once in a shuffled order: "first load" (a new `TpmDeviceKey` each time: CreatePrimary,
Load, session, Unseal), "later load" (one key object reused: the TPM's saved contexts, session,
Unseal), "esys full" (today's ESAPI path, what refusals run) and, with --before, "before first" /
"before later" (the given module, same two ways). Prints medians of wall and of this process's
CPU time. Needs swtpm and tpm2-pytss.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


class _EsysOnly:
    """The ESAPI full path alone (what a refused load runs to name the cause)."""

    def __init__(self, key: Any) -> None:
        self.key = key

    def _open_secret(self) -> Any:
        from modelcloak.keys.tpm import pytss

        state = self.key.state_dir
        blobs = ((state / "sealed.pub").read_bytes(), (state / "sealed.priv").read_bytes())
        return _Closable(self.key._unseal_esys(pytss(), blobs))


class _Closable:
    def __init__(self, data: bytearray) -> None:
        self.data = data

    def close(self) -> None:
        self.data[:] = bytes(len(self.data))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--before", type=Path, help="an older modelcloak/keys/tpm.py to compare with")
    parser.add_argument("--plot", type=Path, help="write a PNG of the medians (wall and CPU per variant)")
    args = parser.parse_args()

    from modelcloak.keys import tpm
    from modelcloak.keys.swtpm import SwTpm

    before: Any = None
    if args.before is not None:
        spec = importlib.util.spec_from_file_location("tpm_before", args.before)
        assert spec is not None and spec.loader is not None
        before = importlib.util.module_from_spec(spec)
        sys.modules["tpm_before"] = before  # dataclasses look their module up while it executes
        spec.loader.exec_module(before)
    root = Path(tempfile.mkdtemp(prefix="modelcloak-bench-tpm-"))
    medians: dict[tuple[str, str], tuple[float, float]] = {}
    with SwTpm(root / "tpm") as software_tpm:
        for pcrs in (None, [7]):
            state = root / f"device-{'pcr' if pcrs else 'plain'}"
            tpm.enroll_device(state, tcti=software_tpm.tcti, pcrs=pcrs)
            kept = tpm.TpmDeviceKey(state, tcti=software_tpm.tcti)
            makers = {
                "first load": lambda state=state: tpm.TpmDeviceKey(state, tcti=software_tpm.tcti),
                "later load": lambda kept=kept: kept,
                "esys full": lambda state=state: _EsysOnly(tpm.TpmDeviceKey(state, tcti=software_tpm.tcti)),
            }
            if before is not None:
                old = before.TpmDeviceKey(state, tcti=software_tpm.tcti)
                makers["before later"] = lambda old=old: old
                makers["before first"] = lambda state=state: before.TpmDeviceKey(state, tcti=software_tpm.tcti)
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in makers}
            for repeat in range(args.repeats + 2):
                order = list(makers)
                random.shuffle(order)
                for name in order:
                    key = makers[name]()
                    wall, cpu = time.perf_counter(), time.process_time()
                    key._open_secret().close()
                    if repeat >= 2:  # the first two warm the page cache and the TPM's slots
                        samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            for name, runs in sorted(samples.items()):
                wall_ms = 1e3 * statistics.median(r[0] for r in runs)
                cpu_ms = 1e3 * statistics.median(r[1] for r in runs)
                label = "PCR 7" if pcrs else "no PCR"
                medians[(label, name)] = (wall_ms, cpu_ms)
                print(f"{label:6s}  {name:12s}  wall {wall_ms:6.2f} ms  CPU {cpu_ms:6.2f} ms  (n={len(runs)})")
    if args.plot is not None:
        _plot(medians, args.plot, args.repeats)
    return 0


def _plot(medians: dict[tuple[str, str], tuple[float, float]], path: Path, repeats: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{enrolment}\n{name}" for enrolment, name in medians]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(labels) + 1.5), sharey=True)
    for axis, column, title in ((axes[0], 0, "wall"), (axes[1], 1, "CPU of this process")):
        axis.barh(labels, [value[column] for value in medians.values()], color="tab:blue")
        axis.set_xlabel(f"ms per unseal ({title}, median of {repeats})")
        axis.invert_yaxis()
    fig.suptitle("one TPM device-key unseal against swtpm")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
