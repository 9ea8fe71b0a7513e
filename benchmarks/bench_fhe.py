"""The SAP paper's FHE cost table for modelcloak's CKKS kernels, plus TenSEAL's built-in product side by side.

    python benchmarks/bench_fhe.py                  # writes benchmarks/out/fhe/fhe.{md,csv,json,png}
    python benchmarks/bench_fhe.py --quick          # 128-bit only, fewer runs and digits
    modelcloak bench-fhe --out benchmarks/out/fhe   # the same through the CLI

The work is in `modelcloak.eval.fhebench` so the CLI and this script run the same code.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "out" / "fhe")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=1000, help="held-out digits for accuracy")
    parser.add_argument("--security", default="128,192,256")
    parser.add_argument("--quick", action="store_true", help="128-bit, 3 runs, 200 digits")
    args = parser.parse_args()
    from modelcloak.eval.fhebench import run_benchmark

    securities = tuple(int(s) for s in args.security.split(","))
    if args.quick:
        securities, args.runs, args.samples = (128,), 3, 200
    run_benchmark(args.out, securities=securities, runs=args.runs, accuracy_samples=args.samples)
    print((args.out / "fhe.md").read_text())


if __name__ == "__main__":
    main()
