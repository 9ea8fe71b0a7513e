"""Owner backend under a bounded load on loopback: usage reports and key releases, SQLite and PostgreSQL.

For each database the script starts a real `modelcloak serve` process (one uvicorn worker) on a
fresh database, then drives it from this process with keep-alive HTTP connections in threads:
usage reports (each reporter a signed, sequence-numbered stream of batches) and attested key
releases (nonce + sim evidence + HPKE unwrap, two requests each). It reports requests/s and
p50/p99 latency, and checks that the server's usage totals equal the sum of acknowledged batches
(zero lost, zero double-counted). The load generator shares the machine's cores with the server.

    python benchmarks/bench_owner.py --usage 4000 --releases 200 --repeats 3
    # writes benchmarks/out/owner.{json,csv,png}
"""

from __future__ import annotations

import argparse
import base64
import csv
import http.client
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

MEASUREMENT = {"app": "ab" * 32}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


class Server:
    def __init__(self, database: str, master_key: Path, log: Path, profile: Path | None = None) -> None:
        self.port = _free_port()
        self.profiled = profile is not None
        # --profile: the server runs under py-spy, which writes collapsed stacks when it exits.
        spy = ["py-spy", "record", "--format", "raw", "--rate", "200", "--gil", "--nonblocking"]
        wrapper = [*spy, "-o", str(profile), "--"] if profile else []
        command = [
            *wrapper,
            sys.executable,
            "-m",
            "modelcloak",
            "serve",
            "--db",
            database,
            "--master-key-file",
            str(master_key),
            "--port",
            str(self.port),
        ]
        self.process = subprocess.Popen(
            command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                connection.request("GET", "/v1/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start: {log.read_text()[-500:]}")

    @property
    def server_pid(self) -> int:
        """The server's own process id (under --profile, py-spy's child)."""
        if not self.profiled:
            return self.process.pid
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(children[0])

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.server_pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.profiled:  # stop the server; py-spy then writes its profile and exits
            os.kill(self.server_pid, signal.SIGTERM)
            self.process.wait(timeout=60)
            return
        self.process.terminate()
        self.process.wait(timeout=10)


def _post(connection: http.client.HTTPConnection, path: str, body: dict) -> tuple[int, dict]:
    connection.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def run_database(
    label: str, database: str, workdir: Path, args: argparse.Namespace, progress, task, workers: int = 1
) -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from modelcloak.keys import KeyFile, generate_key_file
    from modelcloak.licensing.protocol import HPKE_SUITE, binding_digest, release_info, usage_mac
    from modelcloak.owner.evidence.sim import SimDevice
    from modelcloak.owner.service import OwnerService
    from modelcloak.owner.store import MasterKey, Store

    workdir.mkdir(parents=True, exist_ok=True)
    master_file = generate_key_file(workdir / f"{label}.master.key").path
    service = OwnerService(Store(database), MasterKey.from_provider(KeyFile(master_file)))
    model_key = secrets.token_bytes(32)
    service.register_model("bench", model_key)
    device = SimDevice.create(workdir / f"{label}.device.pem")
    service.enroll_device("dev", "sim", MEASUREMENT, identity=device.identity)
    licence = service.issue_licence("bench", device_id="dev", allow_sim=True)
    # `workers` server processes on the one database; client thread i talks to worker i % workers.
    servers = [
        Server(
            database,
            master_file,
            workdir / f"{label}.server{n}.log",
            profile=args.profile / f"{label}-w{workers}-{n}.txt" if args.profile else None,
        )
        for n in range(workers)
    ]

    def server_cpu() -> float:
        return sum(worker.cpu_seconds() for worker in servers)

    results: dict = {"database": label, "workers": workers}
    try:
        # Key releases first (they also hand us the usage key).
        release_latencies: list[float] = []
        usage_key: list[bytes] = []
        errors: list[str] = []
        per_thread = max(1, args.releases // args.threads)

        def releaser(index: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", servers[index % workers].port, timeout=30)
            for _ in range(per_thread):
                start = time.perf_counter()
                status, answer = _post(connection, "/v1/nonce", {"licence_id": licence})
                nonce = base64.b64decode(answer["nonce"])
                ephemeral = X25519PrivateKey.generate()
                public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                evidence = device.evidence(binding_digest(nonce, public), MEASUREMENT)
                status, answer = _post(
                    connection,
                    "/v1/release",
                    {
                        "licence_id": licence,
                        "device_id": "dev",
                        "instance_id": "bench",
                        "nonce": answer["nonce"],
                        "ephemeral_public_key": base64.b64encode(public).decode(),
                        "evidence_kind": "sim",
                        "evidence": base64.b64encode(evidence).decode(),
                    },
                )
                if status != 200:
                    errors.append(answer.get("error", str(status)))
                    continue
                plain = HPKE_SUITE.decrypt(
                    base64.b64decode(answer["wrapped_key"]), ephemeral, info=release_info(licence, nonce)
                )
                release_latencies.append(time.perf_counter() - start)
                if plain[:32] != model_key:
                    errors.append("wrong model key")
                usage_key[:] = [plain[32:]]
                progress.advance(task)

        started, cpu_before, client_before = time.perf_counter(), server_cpu(), time.process_time()
        threads = [threading.Thread(target=releaser, args=(i,)) for i in range(args.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        release_wall = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"{label}: key release failed: {errors[:3]}")
        results["release"] = {
            "count": len(release_latencies),
            "per_s": len(release_latencies) / release_wall,
            "http_requests_per_s": 2 * len(release_latencies) / release_wall,
            "p50_ms": 1000 * statistics.median(release_latencies),
            "p99_ms": 1000 * _percentile(release_latencies, 0.99),
            "server_cpu_ms": 1000 * (server_cpu() - cpu_before) / max(1, len(release_latencies)),
            # The load generator's own CPU (all its threads): it shares the cores with the servers.
            "client_cpu_ms": 1000 * (time.process_time() - client_before) / max(1, len(release_latencies)),
        }

        # Usage reports: one reporter stream per thread, batches of 1..100 queries.
        key = usage_key[0]
        usage_latencies: list[float] = []
        acknowledged = [0] * args.threads
        per_thread = max(1, args.usage // args.threads)

        def reporter(index: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", servers[index % workers].port, timeout=30)
            name = f"r{index}"
            for sequence in range(1, per_thread + 1):
                queries = 1 + (sequence * 37 + index) % 100
                mac = usage_mac(key, licence, name, sequence, queries)
                start = time.perf_counter()
                status, answer = _post(
                    connection,
                    "/v1/usage",
                    {
                        "licence_id": licence,
                        "reporter_id": name,
                        "sequence": sequence,
                        "queries": queries,
                        "mac": base64.b64encode(mac).decode(),
                    },
                )
                usage_latencies.append(time.perf_counter() - start)
                if status != 200 or answer.get("duplicate"):
                    errors.append(f"{status} {answer}")
                    return
                acknowledged[index] += queries
                progress.advance(task)

        started, cpu_before, client_before = time.perf_counter(), server_cpu(), time.process_time()
        threads = [threading.Thread(target=reporter, args=(i,)) for i in range(args.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        usage_wall = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"{label}: usage report failed: {errors[:3]}")
        server_total = service.queries_used(licence)
        streams = service.usage(licence)
        results["usage"] = {
            "count": len(usage_latencies),
            "per_s": len(usage_latencies) / usage_wall,
            "p50_ms": 1000 * statistics.median(usage_latencies),
            "p99_ms": 1000 * _percentile(usage_latencies, 0.99),
            "server_cpu_ms": 1000 * (server_cpu() - cpu_before) / len(usage_latencies),
            "client_cpu_ms": 1000 * (time.process_time() - client_before) / len(usage_latencies),
            "acknowledged_queries": sum(acknowledged),
            "server_queries": server_total,
            "server_batches": sum(s["last_sequence"] for s in streams),
            "lost_or_duplicated": server_total - sum(acknowledged),
        }
    finally:
        for worker in servers:
            worker.stop()
        service.store.close()
    return results


def _median_of(rounds: list[dict]) -> dict:
    merged: dict = {"database": rounds[0]["database"], "workers": rounds[0]["workers"], "rounds": len(rounds)}
    for operation in ("usage", "release"):
        merged[operation] = {
            name: (
                statistics.median(r[operation][name] for r in rounds)
                if name != "lost_or_duplicated"
                else sum(r[operation][name] for r in rounds)
            )
            for name in rounds[0][operation]
        }
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--usage", type=int, default=4000, help="usage reports per database")
    parser.add_argument("--releases", type=int, default=300, help="key releases per database")
    parser.add_argument("--threads", type=int, default=8, help="concurrent client connections")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (databases alternate within a round)")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--profile", type=Path, help="run each server under py-spy; collapsed stacks go here")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1], help="server processes on one database (e.g. 1 2)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from rich.progress import Progress

    workdir = Path(tempfile.mkdtemp(prefix="bench-owner-"))
    cluster = None
    labels = [] if args.no_sqlite else ["sqlite"]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if not args.no_postgres:
        from postgres import PostgresCluster, _bindir

        bindir = _bindir()
        if bindir is None:
            print("PostgreSQL not installed: SQLite only", file=sys.stderr)
        else:
            cluster = PostgresCluster(bindir).start()  # durable: fsync on, as in production
            labels.append("postgresql")
    rounds: list[dict] = []
    try:
        with Progress() as progress:
            for repeat in range(args.repeats):
                for workers in args.workers:
                    for label in labels:
                        # A fresh database every round, so no round starts with a bigger table than another.
                        sqlite_file = str(workdir / f"owner{repeat}w{workers}.db")
                        database = sqlite_file if label == "sqlite" else cluster.new_database()
                        task = progress.add_task(
                            f"{label} x{workers} round {repeat + 1}", total=args.releases + args.usage
                        )
                        rounds.append(
                            run_database(
                                label, database, workdir / f"r{repeat}w{workers}", args, progress, task, workers
                            )
                        )
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [
        _median_of([r for r in rounds if r["database"] == label and r["workers"] == workers])
        for workers in args.workers
        for label in labels
    ]

    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "command": "python benchmarks/bench_owner.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "repeats": args.repeats,
        "statistic": "median over rounds of each round's rate, p50 and p99",
    }
    (args.out / "owner.json").write_text(json.dumps({"meta": meta, "results": rows, "rounds": rounds}, indent=2))
    with open(args.out / "owner.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "database",
                "workers",
                "operation",
                "count",
                "per_s",
                "p50_ms",
                "p99_ms",
                "server_cpu_ms",
                "lost_or_duplicated",
            ]
        )
        for row in rows:
            for operation in ("usage", "release"):
                r = row[operation]
                writer.writerow(
                    [
                        row["database"],
                        row["workers"],
                        operation,
                        r["count"],
                        f"{r['per_s']:.1f}",
                        f"{r['p50_ms']:.2f}",
                        f"{r['p99_ms']:.2f}",
                        f"{r['server_cpu_ms']:.2f}",
                        r.get("lost_or_duplicated", ""),
                    ]
                )
    _plot(rows, args.out / "owner.png", meta)
    print("| database | workers | operation | count | per s | p50 ms | p99 ms | server CPU ms/op | lost or dup. |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for operation in ("usage", "release"):
            r = row[operation]
            print(
                f"| {row['database']} | {row['workers']} | {operation} | {r['count']} | {r['per_s']:.0f} | "
                f"{r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['server_cpu_ms']:.2f} | {r.get('lost_or_duplicated', '')} |"
            )
    print(f"wrote {args.out / 'owner.json'}, owner.csv, owner.png")
    if any(row["usage"]["lost_or_duplicated"] for row in rows):
        sys.exit("usage totals differ from what was acknowledged")


def _plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, latency) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{row['database']} x{row['workers']}\n{op}" for row in rows for op in ("usage", "release")]
    rates = [row[op]["per_s"] for row in rows for op in ("usage", "release")]
    rate.bar(labels, rates, color=["tab:blue", "tab:orange"] * len(rows))
    rate.axhline(500, color="grey", linestyle="--", label="target 500/s (usage)")
    rate.set_ylabel("operations per second")
    rate.legend()
    p50 = [row[op]["p50_ms"] for row in rows for op in ("usage", "release")]
    p99 = [row[op]["p99_ms"] for row in rows for op in ("usage", "release")]
    positions = range(len(labels))
    latency.bar([p - 0.2 for p in positions], p50, width=0.4, label="p50")
    latency.bar([p + 0.2 for p in positions], p99, width=0.4, label="p99")
    latency.set_xticks(list(positions), labels)
    latency.set_ylabel("latency (ms)")
    latency.legend()
    fig.suptitle(f"owner backend on loopback, {meta['threads']} client threads ({meta['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
