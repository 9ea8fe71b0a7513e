"""onnxruntime's session build for EfficientNet-Lite0: small tensors inline vs every tensor external.

    PYTHONPATH=src python benchmarks/bench_lock_build_inline.py --repeats 60

A sealed bundle keeps tensors under 1 KiB inline in its graph (27 of EfficientNet-Lite0's float
tensors) and hands onnxruntime 71 external initializers; a locked bundle locks every float tensor,
so all of them go through `add_external_initializers` (issue 19, item 3). This builds the same
model both ways through `OrtBackend`, with the copy-watch on (what a load does), off, and off but
with onnxruntime logging at INFO (the level the copy-watch needs, lines thrown away), in shuffled
order each repeat, and prints medians of wall and CPU (all threads) per build. The parent exports
the model (torch); the timing runs in a child process without torch.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def child(model_path: Path, repeats: int) -> None:
    import onnx

    from modelcloak import hygiene
    from modelcloak.model.importer import externalize_weights, weight_pieces
    from modelcloak.runtime.backends import OrtBackend

    model = onnx.load(str(model_path))
    floats = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    layouts: dict[str, Any] = {}
    for label, also in (("small inline", ()), ("all external", floats)):
        graph, records, size = externalize_weights(model, also=also)
        data = b"".join(bytes(piece) for piece in weight_pieces(model, records))
        layouts[label] = (graph, data + bytes(size - len(data)), size, len(records))

    def build(label: str, mode: str) -> tuple[float, float]:
        graph, data, size, _ = layouts[label]
        buffer = hygiene.weights_buffer(size)
        view = buffer.view()
        view[:] = data
        config = {"log_severity_level": 1} if mode == "INFO log, no watch" else None
        wall, cpu = time.perf_counter(), time.process_time()
        backend = OrtBackend(
            graph,
            view,
            providers=None,
            threads=None,
            cache_policy="override",
            session_config=config,
            release=buffer.release if mode == "copy-watch" else None,
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        view.release()
        buffer.close()
        backend.close()
        return wall, cpu

    variants = [(label, mode) for label in layouts for mode in ("copy-watch", "no watch", "INFO log, no watch")]
    for variant in variants:  # warm-up
        build(*variant)
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {variant: [] for variant in variants}
    shuffler = random.Random(0)
    for _ in range(repeats):
        order = list(variants)
        shuffler.shuffle(order)
        for variant in order:
            samples[variant].append(build(*variant))
    # The INFO lines of the third mode go to stderr, which the parent points at /dev/null.
    out = os.fdopen(os.dup(1), "w")
    print(f"{'layout':14s} {'initializers':>12s}  {'mode':20s} {'wall ms':>8s} {'CPU ms':>8s}", file=out)
    for (label, mode), runs in samples.items():
        wall = 1e3 * statistics.median(r[0] for r in runs)
        cpu = 1e3 * statistics.median(r[1] for r in runs)
        print(f"{label:14s} {layouts[label][3]:12d}  {mode:20s} {wall:8.2f} {cpu:8.2f}", file=out)
    out.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--model", type=Path, help="an ONNX file instead of exporting EfficientNet-Lite0")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.repeats)
        return 0
    with tempfile.TemporaryDirectory(prefix="modelcloak-bench-build-") as folder:
        model = args.model
        if model is None:
            import onnx

            from modelcloak.eval.lockbench import _efficientnet

            model = Path(folder) / "efficientnet-lite0.onnx"
            onnx.save(_efficientnet(), str(model))
        command = [sys.executable, __file__, "--child", "--model", str(model), "--repeats", str(args.repeats)]
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
