"""Sealed load vs plain load of the same >=100 MB ONNX model, side by side in one run.

Each load sample is a fresh Python process (so peak RSS is that load's alone), interleaving plain,
sealed, signed (bundle format 2: BLAKE3 digests hashed beside the decryption) and signed-v1
(format 1: SHA-256 over the whole file before decrypting); we report medians of wall and CPU time.
Also: single-core decryption throughput, and inference latency of a plain and a sealed session
interleaved in one process.

    python benchmarks/bench_seal.py --runs 9            # writes benchmarks/out/seal.{json,csv,png}
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CHILD = r"""
import json, sys, time
def hwm_kib():
    # VmHWM is per address space and starts fresh at exec (ru_maxrss is inherited from the parent).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import numpy as np
mode, model, bundle, key, signer = sys.argv[1:6]
import onnxruntime as ort
if mode != "plain":
    import modelcloak.inference, modelcloak.keys
base = hwm_kib()
start, cpu_start = time.perf_counter(), time.process_time()
if mode == "plain":
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    run = lambda x: session.run(None, {"x": x})[0]
else:
    trusted = [signer] if mode.startswith("signed") else None
    sealed = modelcloak.inference.load(bundle, key=modelcloak.keys.KeyFile(key), trusted_signers=trusted)
    run = lambda x: sealed.run(x)["logits"]
load_s = time.perf_counter() - start
cpu_s = time.process_time() - cpu_start
peak = hwm_kib()
print(json.dumps({"load_s": load_s, "cpu_s": cpu_s, "peak_kib": peak, "base_kib": base,
                  "checksum": float(run(np.ones((1, %(width)d), np.float32)).sum())}))
"""

SIZES = (1024, 4096, 4096, 2048, 10)


def build(workdir: Path) -> tuple[Path, Path, Path, Path, Path, Path]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: F401

    sys.path.insert(0, str(HERE.parent / "tests" / "support"))
    from models import make_mlp

    from modelcloak.bundle.signing import generate_signing_key
    from modelcloak.keys import generate_key_file
    from modelcloak.protector import protect

    workdir.mkdir(parents=True, exist_ok=True)
    model_path, key_path = workdir / "model.onnx", workdir / "model.key"
    bundle, signed, signed_v1 = workdir / "model.mcb", workdir / "model.signed-v2.mcb", workdir / "model.signed-v1.mcb"
    signer = workdir / "owner.pem"
    if not model_path.exists():
        model_path.write_bytes(make_mlp(SIZES, seed=11).SerializeToString())
    if not key_path.exists():
        generate_key_file(key_path)
    if not signer.exists():
        generate_signing_key(signer)
    key = __import__("modelcloak.keys", fromlist=["KeyFile"]).KeyFile(key_path)
    if not bundle.exists():
        protect(model_path, bundle, key=key)
    if not signed.exists():
        protect(model_path, signed, key=key, signer=signer, format_version=2)
    if not signed_v1.exists():
        protect(model_path, signed_v1, key=key, signer=signer, format_version=1)
    return model_path, bundle, signed, signed_v1, key_path, Path(str(signer) + ".pub")


def decrypt_throughput(bundle: Path, key_path: Path, repeats: int = 7) -> dict[str, float]:
    """GB/s on one thread: into a reused buffer (cipher only) and into a fresh one (as load does)."""
    from modelcloak import hygiene
    from modelcloak.bundle import Bundle
    from modelcloak.keys import KeyFile

    warm, cold = [], []
    with Bundle.open(bundle) as sealed:
        master = KeyFile(key_path).key_for(sealed.manifest.key)
        size = sealed.manifest.section("weights").size
        with hygiene.weights_buffer(size) as buffer:
            for _ in range(repeats):
                view = buffer.view()
                start = time.perf_counter()
                sealed.decrypt_section_into("weights", master.view(), view)
                warm.append(size / (time.perf_counter() - start) / 1e9)
                view.release()
        for _ in range(repeats):
            start = time.perf_counter()
            with hygiene.weights_buffer(size) as buffer:
                view = buffer.view()
                sealed.decrypt_section_into("weights", master.view(), view)
                cold.append(size / (time.perf_counter() - start) / 1e9)
                view.release()
        master.close()
    return {"reused_buffer": statistics.median(warm), "fresh_buffer_incl_alloc_and_faults": statistics.median(cold)}


def latency_side_by_side(model_path: Path, bundle: Path, key_path: Path, rounds: int = 15, per_round: int = 10) -> dict:
    """Median inference latency of a plain and a sealed session in one process, interleaved."""
    import onnxruntime as ort

    from modelcloak.inference import load
    from modelcloak.keys import KeyFile

    plain = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    sealed = load(bundle, key=KeyFile(key_path))
    results = {}
    for batch in (1, 32):
        x = np.random.default_rng(0).standard_normal((batch, SIZES[0])).astype(np.float32)
        runners = {"plain": lambda x=x: plain.run(None, {"x": x}), "sealed": lambda x=x: sealed.run(x)}
        times: dict[str, list[float]] = {"plain": [], "sealed": []}
        for runner in runners.values():
            runner()
        for _ in range(rounds):
            for name, runner in runners.items():
                for _ in range(per_round):
                    start = time.perf_counter()
                    runner()
                    times[name].append(time.perf_counter() - start)
        results[f"batch{batch}"] = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        results[f"batch{batch}"]["ratio"] = results[f"batch{batch}"]["sealed"] / results[f"batch{batch}"]["plain"]
    sealed.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=HERE / "out" / "seal-model")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()

    from rich.progress import Progress

    load_before = os.getloadavg()[0]

    model_path, bundle, signed, signed_v1, key_path, signer_pub = build(args.workdir)
    for path in (model_path, bundle, signed, signed_v1):
        path.read_bytes()  # warm the page cache equally for every variant
    child = CHILD % {"width": SIZES[0]}
    modes = ("plain", "sealed", "signed", "signed-v1")
    bundles = {"plain": bundle, "sealed": bundle, "signed": signed, "signed-v1": signed_v1}
    samples: dict[str, list[dict]] = {m: [] for m in modes}
    with Progress() as progress:
        task = progress.add_task("load samples", total=args.runs * len(modes))
        for run in range(args.runs):
            order = modes if run % 2 == 0 else modes[::-1]
            for mode in order:
                result = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        child,
                        mode,
                        str(model_path),
                        str(bundles[mode]),
                        str(key_path),
                        str(signer_pub),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                samples[mode].append(json.loads(result.stdout.strip().splitlines()[-1]))
                progress.advance(task)
    checksums = {m: samples[m][0]["checksum"] for m in modes}
    assert len(set(checksums.values())) == 1, f"sealed and plain outputs differ: {checksums}"

    def median(mode: str, field: str, sub: str | None = None) -> float:
        values = [s[field][sub] if sub else s[field] for s in samples[mode]]
        return statistics.median(values)

    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "model_bytes": model_path.stat().st_size,
        "runs": args.runs,
        "decrypt_gb_per_s_one_core": decrypt_throughput(bundle, key_path),
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "note": "load_s excludes interpreter and library import; peak_rss is VmHWM of a fresh process",
    }
    for mode in modes:
        summary[mode] = {
            "load_s": median(mode, "load_s"),
            "load_cpu_s": median(mode, "cpu_s"),
            "peak_rss_mib": median(mode, "peak_kib") / 1024,
            "load_rss_mib": statistics.median((s["peak_kib"] - s["base_kib"]) / 1024 for s in samples[mode]),
        }
    for mode in modes[1:]:
        summary[f"{mode}_vs_plain"] = {
            "load_time_ratio": summary[mode]["load_s"] / summary["plain"]["load_s"],
            "load_cpu_ratio": summary[mode]["load_cpu_s"] / summary["plain"]["load_cpu_s"],
            "peak_rss_ratio": summary[mode]["peak_rss_mib"] / summary["plain"]["peak_rss_mib"],
        }
    summary["latency_ms_side_by_side"] = latency_side_by_side(model_path, bundle, key_path)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seal.json").write_text(json.dumps(summary, indent=2))
    with open(args.out / "seal.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mode", "run", "load_s", "cpu_s", "peak_rss_mib", "load_rss_mib"])
        for mode in modes:
            for index, s in enumerate(samples[mode]):
                writer.writerow(
                    [
                        mode,
                        index,
                        f"{s['load_s']:.4f}",
                        f"{s['cpu_s']:.4f}",
                        f"{s['peak_kib'] / 1024:.1f}",
                        f"{(s['peak_kib'] - s['base_kib']) / 1024:.1f}",
                    ]
                )
    plot(samples, summary, args.out / "seal.png")
    print(json.dumps(summary, indent=2))
    print(f"\nload medians of {args.runs} interleaved fresh processes (load average {os.getloadavg()[0]:.1f} now):")
    print(f"{'mode':<10} {'wall s':>8} {'x plain':>8} {'CPU s':>8} {'x plain':>8} {'peak MiB':>9}")
    for mode in modes:
        row = summary[mode]
        wall = row["load_s"] / summary["plain"]["load_s"]
        cpu = row["load_cpu_s"] / summary["plain"]["load_cpu_s"]
        peak = row["peak_rss_mib"]
        print(f"{mode:<10} {row['load_s']:8.3f} {wall:8.2f} {row['load_cpu_s']:8.3f} {cpu:8.2f} {peak:9.0f}")


def plot(samples: dict[str, list[dict]], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(samples)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    panels = [
        ("load time, wall (s)", lambda s: s["load_s"]),
        ("load time, CPU (s)", lambda s: s["cpu_s"]),
        ("peak RSS (MiB, whole process)", lambda s: s["peak_kib"] / 1024),
    ]
    for axis, (title, getter) in zip(axes, panels):
        data = [[getter(s) for s in samples[m]] for m in modes]
        axis.boxplot(data, tick_labels=modes)
        axis.set_title(title)
        axis.set_ylim(bottom=0)
    latency = summary["latency_ms_side_by_side"]
    batches = list(latency)
    width = 0.38
    for offset, name in ((-width / 2, "plain"), (width / 2, "sealed")):
        axes[3].bar([i + offset for i in range(len(batches))], [latency[b][name] for b in batches], width, label=name)
    axes[3].set_xticks(range(len(batches)), batches)
    axes[3].set_title("median inference latency (ms)")
    axes[3].legend()
    fig.suptitle(
        f"sealed vs plain, {summary['model_bytes'] / 1e6:.0f} MB model, {summary['runs']} runs each "
        f"(decrypt {summary['decrypt_gb_per_s_one_core']['fresh_buffer_incl_alloc_and_faults']:.1f} GB/s/core)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
