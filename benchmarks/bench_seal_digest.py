"""What a signature check adds to decrypting the weights, part by part, in one process.

Rounds interleave: decrypt only (unsigned), format 2 streamed (BLAKE3 on a second thread beside
the decryption, the load's order), format 2 verified first, format 1 verified first (SHA-256, two
reads of the file), and the two digests alone over the same ciphertext. Each figure is the median
CPU and wall time of decrypting the 117.6 MB weights section of benchmarks/bench_seal.py's model
(built there if missing) into a fresh guarded buffer, with the signature check where there is one.

    python benchmarks/bench_seal_digest.py --rounds 15      # writes benchmarks/out/seal-digest.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=HERE / "out" / "seal-model")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    from bench_seal import build
    from rich.progress import track

    from modelcloak import hygiene
    from modelcloak.bundle import Bundle, signing
    from modelcloak.keys import KeyFile

    _, unsigned, signed, signed_v1, key_path, _ = build(args.workdir)
    key = KeyFile(key_path)
    modes = {
        "decrypt only (sealed)": (unsigned, None),
        "format 2, streamed": (signed, True),
        "format 2, verified first": (signed, False),
        "format 1, verified first": (signed_v1, False),
        "BLAKE3 alone (reads included)": (signed, "digest"),
        "SHA-256 alone (reads included)": (signed_v1, "digest"),
    }
    for path in {p for p, _ in modes.values()}:
        path.read_bytes()  # the page cache holds every bundle
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    wall: dict[str, list[float]] = {m: [] for m in modes}
    load_before = os.getloadavg()[0]
    for _ in track(range(args.rounds), description="rounds"):
        for mode, (path, streamed) in modes.items():
            with Bundle.open(path) as bundle:
                master = key.key_for(bundle.manifest.key)
                size = bundle.manifest.section("weights").size
                start, cpu_start = time.perf_counter(), time.process_time()
                if streamed == "digest":
                    for name, begin, end in bundle.layout():
                        if name.startswith("section:"):
                            bundle._digest(begin, end - begin)
                else:
                    if streamed is not None:
                        bundle.verify_signature(streamed=streamed)
                    with hygiene.weights_buffer(size) as buffer:
                        view = buffer.view()
                        bundle.decrypt_section_into("weights", master.view(), view)
                        view.release()
                    bundle.finish_verification()  # hashes the small graph section when streamed
                cpu[mode].append(time.process_time() - cpu_start)
                wall[mode].append(time.perf_counter() - start)
                master.close()
    summary = {
        "rounds": args.rounds,
        "weights_bytes": size,
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "blake3_is_available": signing.new_digest(2).name == "blake3",
        "ms": {
            mode: {"cpu": statistics.median(cpu[mode]) * 1e3, "wall": statistics.median(wall[mode]) * 1e3}
            for mode in modes
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seal-digest.json").write_text(json.dumps(summary, indent=2))
    print(f"medians of {args.rounds} interleaved rounds, ms (load average {os.getloadavg()[0]:.1f} now):")
    print(f"{'':32} {'CPU':>7} {'wall':>7}")
    for mode, row in summary["ms"].items():
        print(f"{mode:32} {row['cpu']:7.1f} {row['wall']:7.1f}")


if __name__ == "__main__":
    main()
