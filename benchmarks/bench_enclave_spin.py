"""The enclave channel's spin bound, side by side in one process (issue 13, item 8, round 6).

    python benchmarks/bench_enclave_spin.py --bounds 0,200,600 --rounds 4 --calls 400 --pin [--native]

The bundle of bench_enclave_call.py (small residual CNN split at its dense head). One client per
bound, each with its enclave started with `--spin-us BOUND` and the host's own bound set to match
(0: neither side spins, as before round 6). In every round each client in turn times `calls`
calls of: `enclave.infer` back to back at batch 1; `enclave.infer` right after a whole-model run
(the enclave waits for the host's onnxruntime call between requests, as in a `run()` loop); an
empty PING back to back. With `--pin`, every bound is also measured with the host pinned to one
core and the enclave to another (the first two cores this process may use). Medians over rounds
of each round's median; CPU per call as (host process / enclave process, in 10 ms ticks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("back_to_back", "after_whole_run", "ping")


def _enclave_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` onto `cpus`."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def measure(folder: Path, bounds: list[int], rounds: int, calls: int, native: bool, pin: bool) -> dict[str, object]:
    import numpy as np
    import onnxruntime as ort
    from rich.progress import track

    from modelcloak.bundle import Bundle
    from modelcloak.runtime.enclave_client import EnclaveClient

    with Bundle.open(folder / "m.mcb") as sealed:
        header, ciphertext = sealed.header, sealed.section_ciphertext("private")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.force_spinning_stop", "1")
    whole = ort.InferenceSession(str(folder / "whole.onnx"), options, providers=["CPUExecutionProvider"])
    x = {whole.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)}
    command = json.loads((folder / "native-command.json").read_text()) if native else None
    clients = {}
    for bound in bounds:
        client = EnclaveClient(command=command)
        client.start(["--key-file", str(folder / "enclave.key"), "--spin-us", str(bound)])
        client.load(header, ciphertext)
        spinner = client._conn._inbox._spinner  # the host's side of the same bound
        spinner.limit, spinner.armed = bound / 1e6, bound > 0
        clients[bound] = client
    feeds = {clients[bounds[0]].info.inputs[0].name: np.zeros((1, 32), np.float32)}
    kinds = {
        "back_to_back": lambda c: c.infer(feeds),
        "after_whole_run": lambda c: (whole.run(None, x), c.infer(feeds)),
        "ping": lambda c: c.ping(),
    }
    every_cpu = os.sched_getaffinity(0)
    host_cpu, enclave_cpu = sorted(every_cpu)[:2]
    setups = [(bound, pinned) for pinned in ((False, True) if pin else (False,)) for bound in bounds]
    raw: dict[tuple[int, bool], dict[str, list]] = {setup: {k: [] for k in KINDS} for setup in setups}
    for _ in track(range(rounds), description="rounds"):
        for bound, pinned in setups:
            client = clients[bound]
            # Pinned: the host on one core, the enclave on another, so neither waits for the other's
            # core and each keeps its own caches; unpinned: wherever the scheduler puts them.
            os.sched_setaffinity(0, {host_cpu} if pinned else every_cpu)
            _pin(client.pid, {enclave_cpu} if pinned else every_cpu)
            for kind, func in kinds.items():
                for _ in range(50):
                    func(client)
                times = []
                host0, enclave0 = time.process_time(), _enclave_cpu(client.pid)
                for _ in range(calls):
                    if kind == "after_whole_run":
                        whole.run(None, x)
                    t0 = time.perf_counter()
                    if kind == "ping":
                        client.ping()
                    else:
                        client.infer(feeds)
                    times.append(time.perf_counter() - t0)
                host = (time.process_time() - host0) / calls
                enclave = (_enclave_cpu(client.pid) - enclave0) / calls
                raw[bound, pinned][kind].append((statistics.median(times), host, enclave))
    os.sched_setaffinity(0, every_cpu)
    for client in clients.values():
        client.close()
    return {
        f"{bound} us{', pinned' if pinned else ''}": {
            kind: {
                "ms": statistics.median(r[0] for r in raw[bound, pinned][kind]) * 1e3,
                "host_cpu_ms": statistics.median(r[1] for r in raw[bound, pinned][kind]) * 1e3,
                "enclave_cpu_ms": statistics.median(r[2] for r in raw[bound, pinned][kind]) * 1e3,
            }
            for kind in KINDS
        }
        for bound, pinned in setups
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bounds = list(report["results"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(bounds)
    for i, bound in enumerate(bounds):
        values = [report["results"][bound][kind]["ms"] for kind in KINDS]
        ax.bar(np.arange(len(KINDS)) + (i - (len(bounds) - 1) / 2) * width, values, width, label=f"spin {bound}")
    ax.set_xticks(np.arange(len(KINDS)), ["infer back to back", "infer after a whole-model run", "PING"])
    ax.set_ylabel("ms per call (median over rounds)")
    enclave = "native" if report["native"] else "Python"
    ax.set_title(f"{enclave} enclave, batch 1, by spin bound ({report['machine']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bounds", default="0,200,600", help="spin bounds in microseconds, comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--native", action="store_true", help="the bundle's native (C) enclave instead of Python")
    parser.add_argument(
        "--pin", action="store_true", help="also with the host and the enclave pinned to two different cores"
    )
    parser.add_argument("--out", type=Path, default=HERE / "out" / "enclave-spin.json")
    parser.add_argument("--plot", type=Path, default=HERE / "out" / "enclave-spin.png")
    args = parser.parse_args()
    import bench_enclave_call

    bounds = [int(b) for b in args.bounds.split(",")]
    load_before = os.getloadavg()
    began, cpu0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="modelcloak-bench-") as scratch:
        folder = Path(scratch)
        bench_enclave_call.build(folder, args.native)
        results = measure(folder, bounds, args.rounds, args.calls, args.native, args.pin)
    report = {
        "machine": f"{os.cpu_count()} cores, load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after",
        "run": f"{time.perf_counter() - began:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU in this process",
        "native": args.native,
        "rounds": args.rounds,
        "calls": args.calls,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.plot)
    print(f"{report['machine']}; {report['run']}")
    print("ms per call, median over rounds (host CPU / enclave CPU ms per call)")
    for bound, row in results.items():
        cells = "  ".join(
            f"{kind} {row[kind]['ms']:.3f} ({row[kind]['host_cpu_ms']:.3f}/{row[kind]['enclave_cpu_ms']:.3f})"
            for kind in KINDS
        )
        print(f"spin {bound + ':':<17} {cells}")


if __name__ == "__main__":
    main()
