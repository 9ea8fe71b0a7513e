"""Split inference cost on the MNIST CNN and a larger CNN, plus the bare boundary round trip.

    python benchmarks/bench_splits.py --repeats 50     # writes benchmarks/out/splits-*/ and splits-summary.json

For each model: every candidate cut through the real enclave process (`modelcloak bench-splits`
does the same for one model), at batch 1 and 64, medians. The summary quotes the dense-head cut
(only the dense layers private) against the whole model, side by side in the same run, and the
round trip of a 4 KiB activation to the enclave and back (PING with a 4 KiB payload).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def larger_cnn():
    """A VGG-style CNN on 3x64x64 inputs (~1.2 M weights, ~90 MFLOPs at batch 1)."""
    import torch.nn as nn

    def block(cin: int, cout: int) -> list:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 64),
        *block(64, 128),
        *block(128, 128),  # 128 x 4 x 4
        nn.Flatten(),
        nn.Linear(128 * 16, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def models() -> dict[str, tuple[object, int]]:
    """name -> (ONNX model, number of trailing dense layers = the dense-head cut's `last`)."""
    import torch

    from modelcloak.model import export_torch
    from modelcloak.zoo.mnist import small_cnn

    torch.manual_seed(0)
    return {
        "mnist-cnn": (export_torch(small_cnn(), torch.zeros(1, 1, 28, 28)), 2),
        "larger-cnn": (export_torch(larger_cnn().eval(), torch.zeros(1, 3, 64, 64)), 2),
    }


def boundary_round_trip(repeats: int) -> dict[str, float]:
    """Median PING round trip with 4 KiB and with 0 bytes to a loaded enclave (ms)."""
    import numpy as np  # noqa: F401 - the enclave client needs it loaded anyway

    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import make_mlp

    from modelcloak.bundle import Bundle
    from modelcloak.keys import generate_key_file
    from modelcloak.protector import protect
    from modelcloak.runtime.enclave_client import EnclaveClient

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        host, enclave = generate_key_file(folder / "h.key"), generate_key_file(folder / "e.key")
        protect(make_mlp(), folder / "m.mcb", key=host, scheme="split", cut={"last": 1}, enclave_key=enclave)
        with Bundle.open(folder / "m.mcb") as sealed:
            header, private = sealed.header, sealed.section_ciphertext("private")
        with EnclaveClient() as client:
            client.start(["--key-file", str(enclave.path)])
            client.load(header, private)
            result = {}
            for size in (0, 4096):
                for _ in range(20):
                    client.ping(size)
                result[f"ping_{size}B_ms"] = statistics.median(client.ping(size) for _ in range(repeats * 10)) * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()

    from rich.console import Console

    from modelcloak.eval.splits import bench_splits, write_report
    from modelcloak.model.cut import candidate_cuts, find_cut

    console = Console(stderr=True)
    summary: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "repeats": args.repeats,
        "boundary": boundary_round_trip(args.repeats),
    }
    for name, (model, dense_layers) in models().items():
        console.print(f"[bold]{name}[/bold]: {len(candidate_cuts(model))} cuts")
        rows = bench_splits(model, batches=(1, 64), repeats=args.repeats, on_step=lambda s: console.print("  " + s))
        write_report(rows, args.out / f"splits-{name}", f"latency per cut: {name}")
        head = find_cut(model, last=dense_layers).index
        summary[name] = {
            "cuts": len({row["cut"] for row in rows}),
            "dense_head_cut": head,
            "dense_head": [row for row in rows if row["cut"] == head],
            "enclave_start_s_median": statistics.median(row["enclave_start_s"] for row in rows),
        }
    (args.out / "splits-summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
