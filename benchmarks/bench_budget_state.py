"""Per-call cost of a persistent query budget, and enclave start, side by side (issue 13, items 3 and 8).

    python benchmarks/bench_budget_state.py

Three split bundles of the same MLP (last layer private): no budget, a `session` budget and a
`sealed` budget (state stored by the host after each reservation). 300 interleaved rounds of one
`run()` each at batch 1, after 20 warm-up calls; then the enclave start of five fresh sessions.
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
from models import make_mlp

from modelcloak.inference import load
from modelcloak.keys import generate_key_file
from modelcloak.protector import protect

with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    h, e = generate_key_file(d / "h.key"), generate_key_file(d / "e.key")
    bundles = {}
    for name, policy in (
        ("no budget", {"output": "label"}),
        ("session budget", {"output": "label", "query_budget": 10**9, "budget_counter": "session"}),
        ("sealed budget", {"output": "label", "query_budget": 10**9, "budget_counter": "sealed"}),
    ):
        bundles[name] = d / f"{name}.mcb"
        protect(make_mlp(), bundles[name], key=h, scheme="split", cut={"last": 1}, enclave_key=e, policy=policy)
    sessions = {
        n: load(b, key=h, enclave_key_file=e.path, enclave_budget_state=d / f"{n}.state", threads=1, enclave_threads=1)
        for n, b in bundles.items()
    }
    starts = {n: s.report.seconds["enclave_start"] for n, s in sessions.items()}
    x = {"x": np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)}
    times = {n: [] for n in sessions}
    for s in sessions.values():
        for _ in range(20):
            s.run(x)
    for _ in range(300):
        for n, s in sessions.items():
            t = time.perf_counter()
            s.run(x)
            times[n].append(time.perf_counter() - t)
    for n in sessions:
        p25, p50, p75 = np.percentile(times[n], [25, 50, 75]) * 1e3
        print(f"{n:15s} run() median {p50:.3f} ms (IQR {p25:.3f}-{p75:.3f}); enclave start {starts[n]:.2f} s")
    for s in sessions.values():
        s.close()
    # enclave start, 5 more fresh sessions of the no-budget bundle
    st = []
    for _ in range(5):
        with load(bundles["no budget"], key=h, enclave_key_file=e.path) as s:
            st.append(s.report.seconds["enclave_start"])
    print(
        "enclave start (spawn to READY, 5 sessions):",
        [round(v, 2) for v in st],
        "median",
        round(statistics.median(st), 2),
    )
print("load average", os.getloadavg())
