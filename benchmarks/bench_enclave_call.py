"""Per-call cost of the enclave on a small residual CNN, split at its dense head (issue 13, item 8).

    python benchmarks/bench_enclave_call.py --rounds 6 --calls 300
    git archive <commit> src | tar -x -C /tmp/before      # an older client/enclave to compare with
    python benchmarks/bench_enclave_call.py --before /tmp/before --native --rounds 6 --calls 300

One bundle is built once; each round starts a fresh process (with this tree's `src`, or, with
`--before`, alternately the older tree's and this one's), loads the bundle and times, in
interleaved order, `calls` calls each of: the whole model in onnxruntime, the public part, the
private part run locally, an empty PING to the enclave, `enclave.infer` on the boundary and
`SplitSession.run`, at batch 1 and 32. Figures are medians over rounds of each round's median;
CPU is per call, this process (all threads) and the enclave process (from /proc, 10 ms ticks).
Every onnxruntime session here stops its workers spinning at the end of a run, as a split
session's public part does, so no call's spinning workers slow the next call timed.
"added" is enclave.infer minus the local private part: what the boundary costs per call. Then
5 x `calls` back-to-back enclave.infer calls at batch 1 (nothing in between): the call's own cost;
last, 5 alternating blocks of `calls` back-to-back `SplitSession.run` and whole-model calls at
batch 1 (a caller's loop: the enclave waits only for the public part between requests).
`--native` adds, in the same rounds, this tree with the bundle's native (C) enclave, and with
`--before` also the older tree's native enclave (built from its own C sources).
The last line printed first says the machine's load and the run's wall and CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCHES = (1, 32)
KINDS = ("whole", "public", "private", "ping", "infer", "total")


def small_resnet():  # noqa: ANN201 - torch is imported lazily
    """3x32x32 inputs: conv stem, three residual blocks (16, 16, 32 channels), global pool, 32-64-10 dense head."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.a = nn.Conv2d(channels, channels, 3, padding=1)
            self.b = nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        Block(16),
        nn.MaxPool2d(2),
        Block(16),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        Block(32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    ).eval()


def build_native(folder: Path, name: str) -> None:
    """This tree's native enclave for the bundle in `folder`, its command written to `name`."""
    from modelcloak.bundle import Bundle
    from modelcloak.native import build_for_header

    with Bundle.open(folder / "m.mcb") as sealed:
        header = sealed.header
    private = (folder / "private.onnx").read_bytes()
    command = build_for_header(header, private, folder / name.replace(".json", "")).command()
    (folder / name).write_text(json.dumps(list(command)))


def build(folder: Path, native: bool) -> None:
    import torch

    from modelcloak.keys import generate_key_file
    from modelcloak.model import export_torch
    from modelcloak.model.cut import find_cut, split_model
    from modelcloak.protector import protect

    model = export_torch(small_resnet(), torch.zeros(1, 3, 32, 32))
    cut = find_cut(model, last=2)  # the two dense layers private
    _, private = split_model(model, cut)
    (folder / "whole.onnx").write_bytes(model.SerializeToString())
    (folder / "private.onnx").write_bytes(private.SerializeToString())
    host, enclave = generate_key_file(folder / "host.key"), generate_key_file(folder / "enclave.key")
    protect(model, folder / "m.mcb", key=host, scheme="split", cut={"index": cut.index}, enclave_key=enclave)
    if native:
        build_native(folder, "native-command.json")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _enclave_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(folder: Path, calls: int, threads: int | None, native: str | None) -> dict[str, object]:
    """One round in this process: medians (ms) and CPU per call (ms) of every kind at every batch."""
    import numpy as np
    import onnxruntime as ort

    from modelcloak.inference import load
    from modelcloak.keys import KeyFile
    from modelcloak.options import EnclaveConfig

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # Workers that keep spinning after a run (onnxruntime's default) would steal the cores from
    # whatever is timed next (on 2 cores: up to several ms). No session here gains from it: the same
    # session runs again only after five other calls.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    whole = ort.InferenceSession(str(folder / "whole.onnx"), options, providers=["CPUExecutionProvider"])
    local = ort.InferenceSession(str(folder / "private.onnx"), options, providers=["CPUExecutionProvider"])
    key = KeyFile(folder / "host.key")
    began = time.perf_counter()
    command = tuple(json.loads((folder / native).read_text())) if native else None
    enclave = EnclaveConfig(key_file=folder / "enclave.key", threads=threads, command=command)
    session = load(folder / "m.mcb", key=key, enclave=enclave, threads=threads)
    result: dict[str, object] = {
        "load_s": time.perf_counter() - began,
        "enclave_start_s": session.report.seconds.get("enclave_start"),
        "enclave_ready_s": session.enclave.info.ready_seconds,
    }
    pid = session.enclave.pid
    input_name = whole.get_inputs()[0].name
    for batch in BATCHES:
        feeds = {input_name: np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)}
        crossing = session.boundary(feeds)
        private_feeds = {local.get_inputs()[0].name: next(iter(crossing.values()))}
        funcs = {
            "whole": lambda f=feeds: whole.run(None, f),
            "public": lambda f=feeds: session.boundary(f),
            "private": lambda c=private_feeds: local.run(None, c),
            "ping": lambda: session.enclave.ping(0),
            "infer": lambda c=crossing: session.enclave.infer(c),
            "total": lambda f=feeds: session.run(f),
        }
        for func in funcs.values():
            for _ in range(20):
                func()
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        host_cpu = dict.fromkeys(KINDS, 0.0)
        enclave_cpu = dict.fromkeys(KINDS, 0.0)
        for _ in range(calls):
            for kind, func in funcs.items():
                cpu0, enc0, t0 = time.process_time(), _enclave_cpu(pid), time.perf_counter()
                func()
                times[kind].append(time.perf_counter() - t0)
                host_cpu[kind] += time.process_time() - cpu0
                enclave_cpu[kind] += _enclave_cpu(pid) - enc0
        result[str(batch)] = {
            kind: {
                "ms": statistics.median(times[kind]) * 1e3,
                "host_cpu_ms": host_cpu[kind] / calls * 1e3,
                "enclave_cpu_ms": enclave_cpu[kind] / calls * 1e3,
            }
            for kind in KINDS
        }
    # Back to back, nothing else between calls: the call's own cost, host and enclave CPU included.
    crossing = session.boundary({input_name: np.zeros((1, 3, 32, 32), np.float32)})
    for _ in range(100):
        session.enclave.infer(crossing)
    times, cpu0, enc0 = [], time.process_time(), _enclave_cpu(pid)
    for _ in range(calls * 5):
        t0 = time.perf_counter()
        session.enclave.infer(crossing)
        times.append(time.perf_counter() - t0)
    result["loop"] = {
        "ms": statistics.median(times) * 1e3,
        "host_cpu_ms": (time.process_time() - cpu0) / len(times) * 1e3,
        "enclave_cpu_ms": (_enclave_cpu(pid) - enc0) / len(times) * 1e3,
    }
    # A caller's loop of run() at batch 1 against the same loop of the whole model, in alternating
    # blocks: what a user calling run() back to back sees (the enclave waits only for the public part).
    feeds = {input_name: np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    loops: dict[str, list[float]] = {"whole": [], "total": []}
    cpu = dict.fromkeys(loops, 0.0)
    enclave_cpu_total = 0.0
    for _ in range(5):
        for kind, func in (("whole", lambda: whole.run(None, feeds)), ("total", lambda: session.run(feeds))):
            for _ in range(20):
                func()
            cpu0, enc0 = time.process_time(), _enclave_cpu(pid)
            for _ in range(calls):
                t0 = time.perf_counter()
                func()
                loops[kind].append(time.perf_counter() - t0)
            cpu[kind] += time.process_time() - cpu0
            if kind == "total":
                enclave_cpu_total += _enclave_cpu(pid) - enc0
    count = 5 * calls
    result["run_loop"] = {
        "whole_ms": statistics.median(loops["whole"]) * 1e3,
        "total_ms": statistics.median(loops["total"]) * 1e3,
        "whole_host_cpu_ms": cpu["whole"] / count * 1e3,
        "total_host_cpu_ms": cpu["total"] / count * 1e3,
        "total_enclave_cpu_ms": enclave_cpu_total / count * 1e3,
    }
    session.close()
    return result


def _run_round(folder: Path, src: Path, calls: int, threads: int | None, native: str | None) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, __file__, "--worker", str(folder), "--calls", str(calls)]
    argv += ["--native-command", native] if native else []
    if threads:
        argv += ["--threads", str(threads)]
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rounds: list[dict]) -> dict[str, object]:
    """Medians over rounds, plus the derived figures the targets are about."""
    summary: dict[str, object] = {
        key: statistics.median(r[key] for r in rounds) for key in ("load_s", "enclave_start_s", "enclave_ready_s")
    }
    summary["loop"] = {field: statistics.median(r["loop"][field] for r in rounds) for field in rounds[0]["loop"]}
    summary["run_loop"] = {
        field: statistics.median(r["run_loop"][field] for r in rounds) for field in rounds[0]["run_loop"]
    }
    loop_ratio = [r["run_loop"]["total_ms"] / r["run_loop"]["whole_ms"] for r in rounds]
    summary["run_loop"]["total_vs_whole"] = statistics.median(loop_ratio)
    summary["run_loop"]["total_vs_whole_range"] = [min(loop_ratio), max(loop_ratio)]
    for batch in map(str, BATCHES):
        per = {
            kind: {
                field: statistics.median(r[batch][kind][field] for r in rounds)
                for field in ("ms", "host_cpu_ms", "enclave_cpu_ms")
            }
            for kind in KINDS
        }
        added = [r[batch]["infer"]["ms"] - r[batch]["private"]["ms"] for r in rounds]
        ratio = [r[batch]["total"]["ms"] / r[batch]["whole"]["ms"] for r in rounds]
        summary[batch] = {
            **per,
            "added_ms": statistics.median(added),
            "added_ms_range": [min(added), max(added)],
            "total_vs_whole": statistics.median(ratio),
            "total_vs_whole_range": [min(ratio), max(ratio)],
        }
    return summary


def _table(label: str, summary: dict) -> str:
    lines = [
        f"{label}: enclave start {summary['enclave_start_s']:.2f} s (READY after {summary['enclave_ready_s']:.2f} s)"
    ]
    for batch in map(str, BATCHES):
        row = summary[batch]
        parts = "  ".join(
            f"{kind} {row[kind]['ms']:.3f} ({row[kind]['host_cpu_ms']:.3f}/{row[kind]['enclave_cpu_ms']:.3f})"
            for kind in KINDS
        )
        lines.append(
            f"  batch {batch}: {parts}\n    added {row['added_ms']:.3f} ms "
            f"[{row['added_ms_range'][0]:.3f}..{row['added_ms_range'][1]:.3f}], "
            f"total/whole {row['total_vs_whole']:.2f}x "
            f"[{row['total_vs_whole_range'][0]:.2f}..{row['total_vs_whole_range'][1]:.2f}]"
        )
    loop = summary["loop"]
    lines.append(
        f"  enclave.infer back to back, batch 1: {loop['ms']:.3f} ms "
        f"({loop['host_cpu_ms']:.3f}/{loop['enclave_cpu_ms']:.3f})"
    )
    run = summary["run_loop"]
    lines.append(
        f"  run() back to back, batch 1: {run['total_ms']:.3f} ms ({run['total_host_cpu_ms']:.3f}/"
        f"{run['total_enclave_cpu_ms']:.3f}) against whole {run['whole_ms']:.3f} ms ({run['whole_host_cpu_ms']:.3f}): "
        f"{run['total_vs_whole']:.2f}x [{run['total_vs_whole_range'][0]:.2f}..{run['total_vs_whole_range'][1]:.2f}]"
    )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Per variant: the added cost per call at batch 1 and 32 (whiskers: min..max over rounds) and
    the back-to-back call, against the 0.1 ms target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [label for label in report if isinstance(report[label], dict) and "loop" in report[label]]
    groups = [("added, batch 1", "1"), ("added, batch 32", "32"), ("infer back to back, batch 1", None)]
    fig, (ax, ratio_ax) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        summary = report[label]
        values, low, high = [], [], []
        for _, batch in groups:
            if batch is None:
                values.append(summary["loop"]["ms"])
                low.append(0.0)
                high.append(0.0)
            else:
                value, (lo, hi) = summary[batch]["added_ms"], summary[batch]["added_ms_range"]
                values.append(value)
                low.append(max(0.0, value - lo))
                high.append(max(0.0, hi - value))
        x = np.arange(len(groups)) + (i - (len(labels) - 1) / 2) * width
        ax.bar(x, values, width, yerr=[low, high], capsize=3, label=label)
    ax.axhline(0.1, color="black", linestyle="--", linewidth=1, label="target 0.1 ms")
    ax.set_xticks(np.arange(len(groups)), [name for name, _ in groups])
    ax.set_ylabel("ms per call (median over rounds)")
    ax.set_title("enclave call, small residual CNN, dense-head cut", fontsize=9)
    ax.legend(fontsize=8)
    # Split total / whole model at batch 1: interleaved calls, and a run() loop (whiskers: min..max).
    ratio_groups = [("interleaved, batch 1", lambda s: (s["1"]["total_vs_whole"], s["1"]["total_vs_whole_range"]))]
    if all("run_loop" in report[label] for label in labels):
        ratio_groups.append(
            ("run() loop, batch 1", lambda s: (s["run_loop"]["total_vs_whole"], s["run_loop"]["total_vs_whole_range"]))
        )
    for i, label in enumerate(labels):
        picked = [pick(report[label]) for _, pick in ratio_groups]
        values = [value for value, _ in picked]
        low = [max(0.0, value - lo) for value, (lo, _) in picked]
        high = [max(0.0, hi - value) for value, (_, hi) in picked]
        x = np.arange(len(ratio_groups)) + (i - (len(labels) - 1) / 2) * width
        ratio_ax.bar(x, values, width, yerr=[low, high], capsize=3, label=label)
    ratio_ax.axhline(1.3, color="black", linestyle="--", linewidth=1, label="target 1.3x")
    ratio_ax.set_xticks(np.arange(len(ratio_groups)), [name for name, _ in ratio_groups])
    ratio_ax.set_ylabel("split total / whole model")
    ratio_ax.set_title(report["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads, host and enclave (default: theirs)"
    )
    parser.add_argument("--before", type=Path, help="a tree with an older src/ to compare with, round by round")
    parser.add_argument("--native", action="store_true", help="also this tree with the bundle's native enclave")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "enclave-call.json")
    parser.add_argument("--plot", type=Path, default=HERE / "out" / "enclave-call.png")
    parser.add_argument("--replot", action="store_true", help="only redraw --plot from the JSON in --out")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--native-command", help=argparse.SUPPRESS)
    parser.add_argument("--build-native", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.calls, args.threads, args.native_command)))
        return
    if args.build_native:
        build_native(args.build_native, args.native_command)
        return
    if args.replot:
        plot(json.loads(args.out.read_text()), args.plot)
        return
    current = HERE.parent / "src"
    trees: dict[str, tuple[Path, str | None]] = {"before": (args.before / "src", None)} if args.before else {}
    trees["after" if args.before else "current"] = (current, None)
    if args.native and args.before:
        trees["before, native enclave"] = (args.before / "src", "native-before.json")
    if args.native:
        trees["after, native enclave" if args.before else "native enclave"] = (current, "native-command.json")
    rounds: dict[str, list[dict]] = {label: [] for label in trees}
    load_before = os.getloadavg()
    began, cpu_began = time.perf_counter(), _children_cpu()
    with tempfile.TemporaryDirectory(prefix="modelcloak-bench-") as scratch:
        folder = Path(scratch)
        build(folder, args.native)
        if args.native and args.before:  # the older tree's own C sources and code generator
            subprocess.run(
                [sys.executable, __file__, "--build-native", str(folder), "--native-command", "native-before.json"],
                env={**os.environ, "PYTHONPATH": str(args.before / "src")},
                check=True,
            )
        for index in range(args.rounds):
            for label, (src, native) in trees.items():  # interleaved: load on a shared machine hits all alike
                rounds[label].append(_run_round(folder, src, args.calls, args.threads, native))
                print(f"round {index + 1}/{args.rounds} {label} done", file=sys.stderr)
    wall, cpu = time.perf_counter() - began, _children_cpu() - cpu_began
    report = {
        "machine": f"{os.cpu_count()} cores, load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after",
        "run": f"{wall:.0f} s wall, {cpu:.0f} s CPU in the rounds' processes",
        "rounds": args.rounds,
        "calls": args.calls,
        **{label: summarise(values) for label, values in rounds.items()},
        "raw": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.plot)
    print(report["machine"] + "; " + report["run"])
    print("ms per call, median over rounds (host CPU / enclave CPU ms per call)")
    for label in trees:
        print(_table(label, report[label]))


if __name__ == "__main__":
    main()
