"""The lock scheme's figures: accuracy per device/key/format, wrong-key weight statistics, unlock overhead.

    python benchmarks/bench_lock.py --repeats 9     # writes benchmarks/out/lock/ (lock.md, CSVs, lock.png)

Same as `modelcloak bench-lock --out benchmarks/out/lock`; see modelcloak.eval.lockbench for what
each row means. Two swtpm instances stand in for two machines (Debian packages swtpm, swtpm-tools).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="alternating seal/lock loads per model (median)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the MNIST models")
    parser.add_argument(
        "--synthetic-weights", type=int, default=100_000_000, help="size of the synthetic MLP (0: none)"
    )
    parser.add_argument("--overhead-only", action="store_true", help="only the load-time and size rows")
    parser.add_argument("--no-efficientnet", action="store_true", help="leave EfficientNet-Lite0 out")
    parser.add_argument("--no-mnist", action="store_true", help="leave the MNIST models out (no training)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "lock")
    args = parser.parse_args()

    from modelcloak.eval.lockbench import bench_lock, write_lock_report

    command = " ".join(["python", *sys.argv])
    bench = bench_lock(
        repeats=args.repeats,
        epochs=args.epochs,
        synthetic_weights=args.synthetic_weights,
        overhead_only=args.overhead_only,
        efficientnet=not args.no_efficientnet,
        mnist=not args.no_mnist,
    )
    paths = write_lock_report(bench, args.out, command=command)
    print(paths["md"].read_text())
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
