"""Before/after of the key-switch-minimal baby/giant split, side by side in one process.

    PYTHONPATH=src python benchmarks/bench_fhe_split.py [--runs 7]

The 784-64-32-10 square program (random weights), 128-bit, N=8192 fixed, protected twice: with the
current split (`_cheapest_baby`) and with the earlier b = ceil(sqrt(D)); both packages are
evaluated interleaved, one sample, plaintext and encrypted features; medians of wall and CPU time,
and both package sizes. (The seeded keys apply to both; their effect is measured in
docs/BENCHMARKS.md against a package made before that change.)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    import modelcloak.fhe.program as program_module
    from modelcloak.fhe.engine import EdgeEvaluator, protect_program
    from modelcloak.fhe.program import Activation, DenseProgram

    rng = np.random.default_rng(0)
    shapes = [(784, 64), (64, 32), (32, 10)]
    weights = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in shapes]
    biases = [rng.standard_normal(o) * 0.1 for _, o in shapes]
    program = DenseProgram(weights, biases, [Activation.named("square")] * 2)
    probe = rng.standard_normal((8, 784))
    new = protect_program(program, 128, seed=1, poly_degree=8192, probe=probe)
    current = program_module._cheapest_baby
    program_module._cheapest_baby = lambda d: max(1, math.isqrt(d - 1) + 1 if d > 1 else 1)  # type: ignore[assignment]
    try:
        old = protect_program(program, 128, seed=1, poly_degree=8192, probe=probe)
    finally:
        program_module._cheapest_baby = current
    evaluators = {"sqrt split": EdgeEvaluator(old.edge_package), "key-switch split": EdgeEvaluator(new.edge_package)}
    for name, model in (("sqrt split", old), ("key-switch split", new)):
        plans = [(p.baby, p.giant) for p in evaluators[name].plans]
        print(f"{name}: (baby, giant) per layer {plans}, package {len(model.edge_package) / 2**20:.1f} MiB")
    x = rng.standard_normal((1, 784))
    for encrypt in (False, True):
        walls: dict[str, list[float]] = {k: [] for k in evaluators}
        cpus: dict[str, list[float]] = {k: [] for k in evaluators}
        for _ in range(args.runs):
            for name, evaluator in evaluators.items():
                start, cpu = time.perf_counter(), time.process_time()
                evaluator.evaluate(x, encrypt_features=encrypt)
                walls[name].append(time.perf_counter() - start)
                cpus[name].append(time.process_time() - cpu)
        for name in evaluators:
            wall, cpu = statistics.median(walls[name]) * 1000, statistics.median(cpus[name]) * 1000
            print(f"{'encrypted' if encrypt else 'plaintext'} features, {name}: {wall:.1f} ms wall, {cpu:.1f} ms CPU")


if __name__ == "__main__":
    main()
