"""CPU per enclave call on each side, spinning off, this tree against an older one (issue 13, item 8).

    git archive main src | tar -x -C /tmp/before
    python benchmarks/bench_enclave_cpu.py --before /tmp/before --rounds 4 --calls 4000

With spinning off on both ends (`--spin-us 0` for the enclave, a zero spin bound on the host), the
CPU a call costs is the Python work of each side plus its system calls, not time spent polling
for the other side: what round 6b of item 8 cut. Each round starts a fresh process per tree in
turn (interleaved) on the small residual CNN of bench_enclave_call.py (dense-head cut, batch 1)
and times, three times alternately, `calls` back-to-back `enclave.infer` and empty PINGs. The
PING path is the same in both trees and serves as the control. Medians in µs per call: wall,
host process CPU, enclave process CPU (from /proc, 10 ms ticks: about 2.5 µs at 4,000 calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _enclave_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(folder: Path, calls: int) -> dict[str, list[float]]:
    import numpy as np

    from modelcloak.enclave import spin
    from modelcloak.inference import load
    from modelcloak.keys import KeyFile
    from modelcloak.options import EnclaveConfig
    from modelcloak.runtime.enclave_client import default_command

    command = (*default_command(), "--spin-us", "0")
    enclave = EnclaveConfig(key_file=folder / "enclave.key", command=command)
    with load(folder / "m.mcb", key=KeyFile(folder / "host.key"), enclave=enclave) as session:
        client = session.enclave
        conn = client._conn
        conn._inbox._spinner = spin.Spinner(0.0)  # the host blocks at once, as the enclave does
        pid = conn.proc.pid
        feeds = {conn.info.inputs[0].name: np.random.default_rng(0).standard_normal((1, 32), dtype=np.float32)}
        kinds = {"infer": lambda: client.infer(feeds), "ping": client.ping}
        for call in kinds.values():
            for _ in range(200):
                call()
        out: dict[str, list[float]] = {}
        for _ in range(3):
            for kind, call in kinds.items():
                wall, cpu, enclave_cpu = time.perf_counter(), time.process_time(), _enclave_cpu(pid)
                for _ in range(calls):
                    call()
                out.setdefault(kind, []).extend(
                    [
                        (time.perf_counter() - wall) / calls * 1e6,
                        (time.process_time() - cpu) / calls * 1e6,
                        (_enclave_cpu(pid) - enclave_cpu) / calls * 1e6,
                    ]
                )
    return {kind: [statistics.median(values[i::3]) for i in range(3)] for kind, values in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a tree with an older src/ to compare with, round by round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.calls)))
        return 0
    sys.path.insert(0, str(HERE))
    import bench_enclave_call

    trees = {"after": HERE.parent / "src"}
    if args.before:
        trees = {"before": args.before / "src", **trees}
    began, load_before = time.perf_counter(), os.getloadavg()[0]
    results: dict[str, list[dict[str, list[float]]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bench_enclave_call.build(folder, native=False)
        for round_ in range(args.rounds):
            for name, src in trees.items():
                env = {**os.environ, "PYTHONPATH": str(src)}
                cmd = [sys.executable, __file__, "--worker", str(folder), "--calls", str(args.calls)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1}/{args.rounds} {name} done", file=sys.stderr)
    print(
        f"{os.cpu_count()} cores, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
        f"{time.perf_counter() - began:.0f} s wall"
    )
    print("µs per call, median over rounds [min..max]: wall, host CPU, enclave CPU (spinning off on both ends)")
    for name, rounds in results.items():
        for kind in ("infer", "ping"):
            cells = []
            for i, label in enumerate(("wall", "host CPU", "enclave CPU")):
                values = [r[kind][i] for r in rounds]
                cells.append(f"{label} {statistics.median(values):.1f} [{min(values):.1f}..{max(values):.1f}]")
            print(f"{name:>6} {kind:>5}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
