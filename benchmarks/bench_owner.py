"""Owner backend under load on loopback: key releases and usage reports, SQLite and PostgreSQL.

For each database and worker count the script starts 1..N real `modelcloak serve` processes on one
fresh database and drives them from this process over 64 keep-alive HTTP/1.1 connections (asyncio):
attested key releases (a fresh server nonce, a fresh X25519 key, sim evidence signed over both, the
HPKE answer opened and checked: two requests each) and usage reports (one signed, sequence-numbered
stream of batches per connection). Each operation runs twice:

- closed loop: every connection sends its next request as soon as the previous answer is in. This
  is the most the servers do with 64 clients; by Little's law mean latency = 64 / rate.
- fixed rate (open loop): requests arrive on a fixed schedule (`--release-rate`, `--usage-rate`)
  over the same 64 connections, and latency runs from each request's scheduled arrival.

It reports rate, p50/p99 and CPU per operation of the servers, PostgreSQL, the load generator and
the whole machine (all share the cores), and checks that the server's usage totals equal the sum of
acknowledged batches (zero lost, zero double-counted).

    python benchmarks/bench_owner.py --workers 1 2 --repeats 1    # about 2 minutes
    # writes benchmarks/out/owner.{json,csv,png}
"""

from __future__ import annotations

import argparse
import asyncio
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


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a request is one write, the answer is read by
    its content-length. Much less client CPU than http.client in 64 threads, so more of the two shared
    cores is left to the servers and the database."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: bytes, payload: dict) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        body = json.dumps(payload).encode()
        self.writer.write(
            b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (path, len(body), body)
        )
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        at = head.lower().index(b"content-length:") + 15
        length = int(head[at : head.index(b"\r\n", at)])
        return status, json.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class CpuMeter:
    """CPU used between `start()` and `stop()`: servers, database, this load generator, the whole machine."""

    def __init__(self, servers: list[Server], postgres: Path | None) -> None:
        self.servers, self.postgres = servers, postgres

    def _database(self) -> float:
        if self.postgres is None:  # SQLite runs inside the servers
            return 0.0
        postmaster = int((self.postgres / "postmaster.pid").read_text().split()[0])
        # The postmaster's own time plus its reaped children's, plus every live backend's.
        total = _proc_cpu(postmaster, children=True)
        for child in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split():
            total += _proc_cpu(int(child))
        return total

    @staticmethod
    def _machine() -> tuple[float, float]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), sum(fields[:8]) / os.sysconf("SC_CLK_TCK")

    def snapshot(self) -> tuple[float, float, float, float]:
        busy, _ = self._machine()
        server = sum(worker.cpu_seconds() for worker in self.servers)
        return server, self._database(), time.process_time(), busy

    def per_op(self, before: tuple[float, float, float, float], count: int) -> dict:
        after = self.snapshot()
        names = ("server_cpu_ms", "database_cpu_ms", "client_cpu_ms", "machine_busy_ms")
        return {name: 1000 * (a - b) / max(1, count) for name, a, b in zip(names, after, before, strict=True)}


def _proc_cpu(pid: int, *, children: bool = False) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # exited between the listing and the read
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


async def closed_loop(connections: list[Connection], count: int, operation) -> tuple[list[float], float]:
    """Each connection sends its next request as soon as its previous answer is in: the most the
    servers can do with this many clients (by Little's law, mean latency = clients / rate)."""
    latencies: list[float] = []
    per_connection = max(1, count // len(connections))

    async def client(connection: Connection) -> None:
        for _ in range(per_connection):
            start = time.perf_counter()
            await operation(connection)
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in connections))
    return latencies, time.perf_counter() - started


async def open_loop(
    connections: list[Connection], rate: float, seconds: float, operation
) -> tuple[list[float], float, int]:
    """Requests arrive on a fixed schedule of `rate` per second, whatever the answers do, and go out on
    whichever of the connections is free. A request's latency runs from its scheduled arrival, so time
    spent waiting for a free connection (the servers falling behind) counts too."""
    loop = asyncio.get_running_loop()
    total = max(1, int(rate * seconds))
    latencies: list[float] = []
    begin = loop.time() + 0.05
    state = {"next": 0}

    async def client(connection: Connection) -> None:
        while state["next"] < total:
            due = begin + state["next"] / rate
            state["next"] += 1
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            await operation(connection)
            latencies.append(loop.time() - due)

    await asyncio.gather(*(client(c) for c in connections))
    return latencies, loop.time() - begin, total


def _summary(latencies: list[float], wall: float, meter: CpuMeter, before: tuple, **extra) -> dict:
    return {
        "count": len(latencies),
        "per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        **meter.per_op(before, len(latencies)),
        **extra,
    }


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
    # `workers` server processes on the one database; client connection i talks to worker i % workers.
    servers = [
        Server(
            database,
            master_file,
            workdir / f"{label}.server{n}.log",
            profile=args.profile / f"{label}-w{workers}-{n}.txt" if args.profile else None,
        )
        for n in range(workers)
    ]
    meter = CpuMeter(servers, args.postgres_data if label == "postgresql" else None)
    results: dict = {"database": label, "workers": workers}
    usage_key: list[bytes] = []
    errors: list[str] = []

    async def release(connection: Connection) -> None:
        # The device's real work, every time: a fresh server nonce, a fresh ephemeral key, signed evidence
        # bound to both, and the HPKE answer opened and checked.
        status, answer = await connection.post(b"/v1/nonce", {"licence_id": licence})
        if status != 200:
            errors.append(f"nonce {status} {answer}")
            return
        nonce = base64.b64decode(answer["nonce"])
        ephemeral = X25519PrivateKey.generate()
        public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        evidence = device.evidence(binding_digest(nonce, public), MEASUREMENT)
        status, answer = await connection.post(
            b"/v1/release",
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
            errors.append(f"release {status} {answer}")
            return
        plain = HPKE_SUITE.decrypt(
            base64.b64decode(answer["wrapped_key"]), ephemeral, info=release_info(licence, nonce)
        )
        if plain[:32] != model_key:
            errors.append("wrong model key")
        usage_key[:] = [plain[32:]]
        progress.advance(task)

    # One reporter stream per connection (batches of 1..100 queries), continued from phase to phase.
    sequences: dict[int, int] = {}
    acknowledged: dict[int, int] = {}

    async def report(connection: Connection) -> None:
        index = id(connection)
        sequence = sequences[index] = sequences.get(index, 0) + 1
        name = f"r{connections.index(connection)}"
        queries = 1 + (sequence * 37 + len(name)) % 100
        mac = usage_mac(usage_key[0], licence, name, sequence, queries)
        status, answer = await connection.post(
            b"/v1/usage",
            {
                "licence_id": licence,
                "reporter_id": name,
                "sequence": sequence,
                "queries": queries,
                "mac": base64.b64encode(mac).decode(),
            },
        )
        if status != 200 or answer.get("duplicate"):
            errors.append(f"usage {status} {answer}")
            return
        acknowledged[index] = acknowledged.get(index, 0) + queries
        progress.advance(task)

    connections = [Connection(servers[i % workers].port) for i in range(args.clients)]

    def check(phase: str) -> None:
        if errors:
            raise RuntimeError(f"{label} {phase}: {errors[:3]}")

    async def phases() -> None:
        before = meter.snapshot()
        latencies, wall = await closed_loop(connections, args.releases, release)
        check("key release")
        results["release"] = _summary(latencies, wall, meter, before, http_requests_per_s=2 * len(latencies) / wall)
        if args.release_rate:
            before = meter.snapshot()
            latencies, wall, offered = await open_loop(connections, args.release_rate, args.open_seconds, release)
            check("key release at a fixed rate")
            results["release_open"] = _summary(latencies, wall, meter, before, offered_per_s=args.release_rate)
        before = meter.snapshot()
        latencies, wall = await closed_loop(connections, args.usage, report)
        check("usage report")
        results["usage"] = _summary(latencies, wall, meter, before)
        if args.usage_rate:
            before = meter.snapshot()
            latencies, wall, offered = await open_loop(connections, args.usage_rate, args.open_seconds, report)
            check("usage report at a fixed rate")
            results["usage_open"] = _summary(latencies, wall, meter, before, offered_per_s=args.usage_rate)
        for connection in connections:
            connection.close()

    try:
        _event_loop_run(phases())
        server_total = service.queries_used(licence)
        streams = service.usage(licence)
        results["usage"].update(
            {
                "acknowledged_queries": sum(acknowledged.values()),
                "server_queries": server_total,
                "server_batches": sum(s["last_sequence"] for s in streams),
                "acknowledged_batches": sum(sequences.values()),
                "lost_or_duplicated": server_total - sum(acknowledged.values()),
            }
        )
    finally:
        for worker in servers:
            worker.stop()
        service.store.close()
    return results


def _event_loop_run(coroutine) -> None:
    try:
        import uvloop

        uvloop.run(coroutine)
    except ImportError:
        asyncio.run(coroutine)


# (key in a round's results, label in the tables): closed loop = as fast as 64 clients go; open loop =
# requests arriving at a fixed rate over the same 64 connections.
OPERATIONS = (
    ("release", "key release, closed loop"),
    ("release_open", "key release, fixed rate"),
    ("usage", "usage report, closed loop"),
    ("usage_open", "usage report, fixed rate"),
)


def _median_of(rounds: list[dict]) -> dict:
    merged: dict = {"database": rounds[0]["database"], "workers": rounds[0]["workers"], "rounds": len(rounds)}
    for operation, _label in OPERATIONS:
        if operation not in rounds[0]:
            continue
        merged[operation] = {
            name: (
                statistics.median(r[operation][name] for r in rounds)
                if name != "lost_or_duplicated"
                else sum(r[operation][name] for r in rounds)
            )
            for name in rounds[0][operation]
        }
    return merged


COLUMNS = (
    ("per_s", "per s", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("server_cpu_ms", "server CPU ms/op", "{:.2f}"),
    ("database_cpu_ms", "PostgreSQL CPU ms/op", "{:.2f}"),
    ("client_cpu_ms", "load generator CPU ms/op", "{:.2f}"),
    ("machine_busy_ms", "machine busy ms/op", "{:.2f}"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--usage", type=int, default=4096, help="usage reports per round, closed loop")
    parser.add_argument("--releases", type=int, default=1024, help="key releases per round, closed loop")
    parser.add_argument(
        "--clients", "--threads", dest="clients", type=int, default=64, help="concurrent client connections"
    )
    parser.add_argument(
        "--release-rate", type=float, default=500, help="offered key releases/s, fixed-rate phase (0: skip)"
    )
    parser.add_argument(
        "--usage-rate", type=float, default=1000, help="offered usage reports/s, fixed-rate phase (0: skip)"
    )
    parser.add_argument("--open-seconds", type=float, default=4.0, help="length of each fixed-rate phase")
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
    args.postgres_data = None
    if not args.no_postgres:
        from postgres import PostgresCluster, _bindir

        bindir = _bindir()
        if bindir is None:
            print("PostgreSQL not installed: SQLite only", file=sys.stderr)
        else:
            cluster = PostgresCluster(bindir).start()  # durable: fsync on, as in production
            args.postgres_data = cluster.root / "data"
            labels.append("postgresql")
    load_before = os.getloadavg()[0]
    rounds: list[dict] = []
    per_round = args.releases + args.usage + int((args.release_rate + args.usage_rate) * args.open_seconds)
    try:
        with Progress() as progress:
            for repeat in range(args.repeats):
                for workers in args.workers:
                    for label in labels:
                        # A fresh database every round, so no round starts with a bigger table than another.
                        sqlite_file = str(workdir / f"owner{repeat}w{workers}.db")
                        database = sqlite_file if label == "sqlite" else cluster.new_database()
                        task = progress.add_task(f"{label} x{workers} round {repeat + 1}", total=per_round)
                        one = run_database(
                            label, database, workdir / f"r{repeat}w{workers}", args, progress, task, workers
                        )
                        one["load_average"] = os.getloadavg()[0]
                        rounds.append(one)
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
        "clients": args.clients,
        "repeats": args.repeats,
        "load_average_at_start": load_before,
        "load_average_after_rounds": [r["load_average"] for r in rounds],
        "statistic": "median over rounds of each round's rate, p50, p99 and CPU per operation",
        "fixed_rate": "latency from each request's scheduled arrival; arrivals do not wait for answers",
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
                "offered_per_s",
                *(c[0] for c in COLUMNS),
                "lost_or_duplicated",
            ]
        )
        for row in rows:
            for operation, _label in OPERATIONS:
                if operation in row:
                    r = row[operation]
                    writer.writerow(
                        [
                            row["database"],
                            row["workers"],
                            operation,
                            r["count"],
                            r.get("offered_per_s", ""),
                            *(f"{r[c[0]]:.2f}" for c in COLUMNS),
                            r.get("lost_or_duplicated", ""),
                        ]
                    )
    _plot(rows, args.out / "owner.png", meta)
    print(f"load average {load_before:.2f} at the start; {args.clients} clients; medians of {args.repeats} round(s)")
    print("| database | workers | operation | offered/s | " + " | ".join(c[1] for c in COLUMNS) + " | lost or dup. |")
    print("|---|---:|---|---:|" + "---:|" * len(COLUMNS) + "---|")
    for row in rows:
        for operation, label in OPERATIONS:
            if operation in row:
                r = row[operation]
                cells = " | ".join(fmt.format(r[key]) for key, _name, fmt in COLUMNS)
                offered = f"{r['offered_per_s']:.0f}" if "offered_per_s" in r else "as fast as possible"
                print(
                    f"| {row['database']} | {row['workers']} | {label} | {offered} | {cells} | "
                    f"{r.get('lost_or_duplicated', '')} |"
                )
    print(f"wrote {args.out / 'owner.json'}, owner.csv, owner.png")
    if any(row["usage"]["lost_or_duplicated"] for row in rows):
        sys.exit("usage totals differ from what was acknowledged")


def _plot(rows: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    shown = [(row, op) for row in rows for op, _label in OPERATIONS if op in row]
    labels = [f"{row['database']} x{row['workers']}\n{op.replace('_open', ' fixed')}" for row, op in shown]
    rate.bar(labels, [row[op]["per_s"] for row, op in shown], color=["tab:orange", "tab:red", "tab:blue", "tab:cyan"])
    rate.axhline(500, color="grey", linestyle="--", label="target: 500 releases/s")
    rate.axhline(1000, color="grey", linestyle=":", label="target: 1,000 usage reports/s")
    rate.set_ylabel("operations per second")
    rate.tick_params(axis="x", labelsize=7)
    rate.legend(fontsize=7)
    positions = range(len(labels))
    latency.bar([p - 0.2 for p in positions], [row[op]["p50_ms"] for row, op in shown], width=0.4, label="p50")
    latency.bar([p + 0.2 for p in positions], [row[op]["p99_ms"] for row, op in shown], width=0.4, label="p99")
    latency.axhline(100, color="grey", linestyle="--", label="target p99 100 ms")
    latency.set_xticks(list(positions), labels)
    latency.tick_params(axis="x", labelsize=7)
    latency.set_ylabel("latency (ms)")
    latency.set_yscale("log")
    latency.legend(fontsize=7)
    fig.suptitle(f"owner backend on loopback, {meta['clients']} client connections ({meta['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
