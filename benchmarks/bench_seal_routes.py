"""Where the sealed load's extra peak memory comes from: every way onnxruntime's Python API can be
handed in-memory weights, measured side by side with plain onnxruntime on the bench_seal model.

Each sample is a fresh process. For each route it records peak RSS (VmHWM, reset once the
weights are in memory so only the load counts, plus the whole process), load time (wall and CPU),
the RSS the load adds (for routes that start from a caller's buffer, that buffer counts as added:
the sealed load decrypts into its own), the output checksum (bit-equal to plain onnxruntime's
defaults or not) and whether the session still reads the caller's buffer after it is built (the
buffer is overwritten and the model run again: unchanged output means onnxruntime made its own
copy). It also samples the RSS of a plain, a sealed and a sealed-held load every 2 ms from
outside, to show when each copy appears.

    python benchmarks/bench_seal_routes.py --runs 3   # builds the bench_seal model if missing
                                                      # writes benchmarks/out/seal-routes.{json,png}

The routes other than `plain*` and `sealed*` use a plaintext weights file and a converted ORT-format
model written into the work folder: they are owner-side experiments on a public benchmark model,
not something `modelcloak` does on a device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROUTES = {
    "plain": "onnxruntime.InferenceSession(path), defaults",
    "plain-noprepack": "the same with session.disable_prepacking=1",
    "sealed": "modelcloak.load: OrtValues over the guarded buffer, each weight handed back once copied",
    "sealed-held": "the same with the hand-back switched off: the buffer lives until the build returns",
    "sealed-noprepack": "modelcloak.load with session_config session.disable_prepacking=1",
    "files-in-memory": "add_external_initializers_from_files_in_memory over an anonymous mapping",
    "ort-format-copied": "ORT-format bytes, onnxruntime copies them",
    "ort-format-in-place": "ORT-format bytes, session.use_ort_model_bytes_directly/_for_initializers=1",
}
CHILD = r"""
import ctypes, json, mmap, os, sys, time
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
import numpy as np, onnxruntime as ort
route, folder = sys.argv[1:3]
noprepack = route.endswith("noprepack")
if route.startswith("sealed"):
    import re
    import modelcloak.inference, modelcloak.keys
    from modelcloak.runtime import copywatch
    if route == "sealed-held":
        copywatch._COPIED = re.compile(rb"(?!)")  # never matches: nothing is handed back early
buffer = None
if route in ("files-in-memory", "ort-format-copied", "ort-format-in-place"):
    name = "weights.bin" if route == "files-in-memory" else "model.ort"
    with open(folder + "/" + name, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = mmap.mmap(-1, size)
        handle.readinto(buffer)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
graph = open(folder + "/graph.onnx", "rb").read()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: count the build only
base = status("VmRSS")
options = ort.SessionOptions()
if noprepack:
    options.add_session_config_entry("session.disable_prepacking", "1")
wall, cpu = time.perf_counter(), time.process_time()
if route.startswith("plain"):
    session = ort.InferenceSession(folder + "/model.onnx", options, providers=["CPUExecutionProvider"])
    run = lambda x: session.run(None, {"x": x})[0]
elif route.startswith("sealed"):
    config = {"session.disable_prepacking": "1"} if noprepack else None
    sealed = modelcloak.inference.load(folder + "/model.mcb", key=modelcloak.keys.KeyFile(folder + "/model.key"),
                                       session_config=config)
    run = lambda x: sealed.run(x)["logits"]
elif route == "files-in-memory":
    options.add_external_initializers_from_files_in_memory(["modelcloak_weights"], [buffer], [len(buffer)])
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    run = lambda x: session.run(None, {"x": x})[0]
else:
    if route == "ort-format-in-place":
        options.add_session_config_entry("session.use_ort_model_bytes_directly", "1")
        options.add_session_config_entry("session.use_ort_model_bytes_for_initializers", "1")
    session = ort.InferenceSession(bytes(buffer), options, providers=["CPUExecutionProvider"])
    run = lambda x: session.run(None, {"x": x})[0]
load_wall, load_cpu = time.perf_counter() - wall, time.process_time() - cpu
peak = status("VmHWM")
x = np.ones((1, %(width)d), np.float32)
checksum = run(x).tobytes().hex()
reads_buffer = None
if buffer is not None:
    ctypes.memset(address, 0, len(buffer))
    reads_buffer = run(x).tobytes().hex() != checksum
held = len(buffer) / 2**20 if buffer is not None else 0.0  # in memory before the reset
print(json.dumps({"load_s": load_wall, "cpu_s": load_cpu, "base_mib": base, "build_peak_mib": peak,
                  "added_mib": peak - base + held, "steady_mib": status("VmRSS"), "checksum": checksum,
                  "reads_buffer_after_build": reads_buffer}))
"""


def prepare(workdir: Path) -> None:
    """The weightless graph + weights file (external data) and the ORT-format model, owner side."""
    import onnx
    import onnxruntime as ort
    from onnx import external_data_helper

    if not (workdir / "graph.onnx").exists() or not (workdir / "weights.bin").exists():
        model = onnx.load(str(workdir / "model.onnx"))
        offset, parts = 0, []
        for tensor in model.graph.initializer:
            data = tensor.raw_data
            external_data_helper.set_external_data(tensor, "modelcloak_weights", offset, len(data))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            parts.append(data)
            offset += len(data)
        (workdir / "weights.bin").write_bytes(b"".join(parts))
        (workdir / "graph.onnx").write_bytes(model.SerializeToString())
    if not (workdir / "model.ort").exists():
        # Saved at the basic level: what an ORT-format model keeps is the graph after the
        # optimisations that do not depend on the device; the rest run again at load.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(workdir / "model.ort")
        options.add_session_config_entry("session.save_model_format", "ORT")
        ort.InferenceSession(str(workdir / "model.onnx"), options, providers=["CPUExecutionProvider"])


def sample(route: str, workdir: Path, child: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", child, route, str(workdir)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = f"signal {-result.returncode}" if result.returncode < 0 else f"exit {result.returncode}"
        last = (result.stderr.strip().splitlines() or [""])[-1][:200]
        return {"failed": f"{reason} {last}".strip()}
    return json.loads(result.stdout.strip().splitlines()[-1])


def rss_trace(route: str, workdir: Path, child: str) -> list[tuple[float, float]]:
    """VmRSS of a child every 2 ms, read from outside (the child's own threads hold the GIL)."""
    process = subprocess.Popen(
        [sys.executable, "-c", child, route, str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    trace, start = [], time.perf_counter()
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        trace.append((time.perf_counter() - start, int(line.split()[1]) / 1024))
        except OSError:
            break
        time.sleep(0.002)
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=HERE / "out" / "seal-model")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()
    from rich.progress import Progress

    sys.path.insert(0, str(HERE))
    from bench_seal import SIZES, build

    build(args.workdir)
    prepare(args.workdir)
    child = CHILD % {"width": SIZES[0]}
    samples: dict[str, list[dict]] = {route: [] for route in ROUTES}
    with Progress() as progress:
        task = progress.add_task("route samples", total=args.runs * len(ROUTES) + 3)
        for run in range(args.runs):
            order = list(ROUTES) if run % 2 == 0 else list(ROUTES)[::-1]
            for route in order:
                samples[route].append(sample(route, args.workdir, child))
                progress.advance(task)
        traces = {}
        for route in ("plain", "sealed", "sealed-held"):
            traces[route] = rss_trace(route, args.workdir, child)
            progress.advance(task)
    reference = next(s["checksum"] for s in samples["plain"] if "checksum" in s)
    summary: dict = {"runs": args.runs, "weights_mib": (args.workdir / "weights.bin").stat().st_size / 2**20}
    for route, description in ROUTES.items():
        good = [s for s in samples[route] if "failed" not in s]
        if not good:
            summary[route] = {"what": description, "failed": samples[route][0]["failed"]}
            continue
        summary[route] = {
            "what": description,
            "load_s": statistics.median(s["load_s"] for s in good),
            "load_cpu_s": statistics.median(s["cpu_s"] for s in good),
            "load_added_mib": statistics.median(s["added_mib"] for s in good),
            "process_peak_mib": statistics.median(s["build_peak_mib"] for s in good),
            "steady_mib": statistics.median(s["steady_mib"] for s in good),
            "bit_equal_to_plain": all(s["checksum"] == reference for s in good),
            "reads_buffer_after_build": good[0]["reads_buffer_after_build"],
            "failed_samples": len(samples[route]) - len(good),
        }
    plain_added = summary["plain"]["load_added_mib"]
    for route in ROUTES:
        if "load_added_mib" in summary[route]:
            summary[route]["load_added_ratio"] = summary[route]["load_added_mib"] / plain_added
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seal-routes.json").write_text(json.dumps({"summary": summary, "traces": traces}, indent=2))
    plot(summary, traces, args.out / "seal-routes.png")
    print(json.dumps(summary, indent=2))


def plot(summary: dict, traces: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2))
    routes = [r for r in ROUTES if "load_added_mib" in summary[r]]
    colours = ["tab:green" if summary[r]["bit_equal_to_plain"] else "tab:orange" for r in routes]
    left.barh(routes, [summary[r]["load_added_mib"] for r in routes], color=colours)
    left.axvline(summary["weights_mib"], color="grey", linestyle=":", label="weights once")
    left.set_xlabel("RSS added by the load (weights in memory + session), MiB, median")
    failed = [r for r in ROUTES if "failed" in summary[r]]
    title = "green: outputs bit-equal to plain; orange: not"
    left.set_title(title + "".join(f"\n{r}: {summary[r]['failed']}" for r in failed), fontsize=9)
    left.invert_yaxis()
    left.legend(loc="lower right")
    for route, trace in traces.items():
        if trace:
            right.plot([t for t, _ in trace], [r for _, r in trace], label=route)
    right.axhline(summary["weights_mib"], color="grey", linestyle=":")
    right.set_xlabel("seconds since the child started")
    right.set_ylabel("VmRSS, MiB")
    right.set_title("RSS over one load, sampled every 2 ms")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
