"""The soft lock on an ONNX graph with branches: a residual CNN exported by torch, soft-locked from the file.

    PYTHONPATH=src python benchmarks/bench_soft_lock_residual.py --train-epochs 10 --lock-epochs 6

Trains `modelcloak.zoo.residual.residual_cnn` on sklearn's 8x8 digits (first 1,400 images; the
other 397 held out), exports it with torch's ONNX exporter, and runs what `modelcloak soft-lock`
runs on that file (`soft_lock_file`): the graph is rebuilt as a torch.fx module, fine-tuned with
the lock, exported again, and both models are measured in FP32, FP16, INT8 dynamic and INT8
static by onnxruntime's own tools. Prints the accuracy table, the lock site and the times.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-epochs", type=int, default=10)
    parser.add_argument("--lock-epochs", type=int, default=6)
    args = parser.parse_args()

    import numpy as np
    import onnx
    import torch
    from sklearn.datasets import load_digits

    from modelcloak.lock.soft_file import soft_lock_file
    from modelcloak.model.torch_export import export_torch
    from modelcloak.training import train_classifier
    from modelcloak.zoo.residual import residual_cnn

    x, y = load_digits(return_X_y=True)
    x, y = (x / 16).astype(np.float32).reshape(-1, 1, 8, 8), y.astype(np.int64)
    net = residual_cnn(seed=0)
    clock, cpu = time.perf_counter(), time.process_time()
    train_classifier(net, x[:1400], y[:1400], epochs=args.train_epochs, progress=False)
    trained = time.perf_counter() - clock, time.process_time() - cpu
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "residual.onnx"
        onnx.save(export_torch(net, torch.from_numpy(x[:2])), path)
        clock, cpu = time.perf_counter(), time.process_time()
        report = soft_lock_file(path, x[:1400], y[:1400], x[1400:], y[1400:], epochs=args.lock_epochs)
        locked = time.perf_counter() - clock, time.process_time() - cpu
    print("| format | original | soft-locked |")
    print("|---|---:|---:|")
    for variant, accuracy in report.original.items():
        print(f"| {variant} | {100 * accuracy:.1f}% | {100 * report.soft_locked[variant]:.1f}% |")
    print(f"chance {100 * report.chance:.1f}%; site {report.site}; notes {report.notes}")
    print(f"train {trained[0]:.0f} s wall / {trained[1]:.0f} s CPU; soft lock {locked[0]:.0f} s / {locked[1]:.0f} s")
    print(json.dumps(report.as_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
