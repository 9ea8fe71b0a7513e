"""The cost of the runtime-copy measures on a sealed load: wipe-on-free (glibc M_PERTURB) and
DONTDUMP on anonymous memory, on and off, in interleaved fresh processes.

    python benchmarks/bench_seal_hygiene.py --pairs 5    # needs benchmarks/out/seal-model (bench_seal.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = r"""
import json, sys, time
import modelcloak.inference, modelcloak.keys
import modelcloak.runtime.session as session_module
from modelcloak import hygiene
mode, folder = sys.argv[1:3]
if mode == "off":
    hygiene.wipe_freed_heap = lambda: False
    session_module.hygiene.exclude_anonymous_memory_from_dumps = lambda: 0
wall, cpu = time.perf_counter(), time.process_time()
session = modelcloak.inference.load(folder + "/model.mcb", key=modelcloak.keys.KeyFile(folder + "/model.key"))
load = (time.perf_counter() - wall, time.process_time() - cpu)
wall, cpu = time.perf_counter(), time.process_time()
session.close()
print(json.dumps({"load_wall": load[0], "load_cpu": load[1],
                  "close_wall": time.perf_counter() - wall, "close_cpu": time.process_time() - cpu}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=HERE / "out" / "seal-model")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {"on": [], "off": []}
    for pair in range(args.pairs):
        for mode in ("on", "off") if pair % 2 == 0 else ("off", "on"):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(args.workdir)], capture_output=True, text=True, check=True
            )
            rows[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {
        mode: {field: statistics.median(r[field] for r in values) for field in values[0]}
        for mode, values in rows.items()
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
