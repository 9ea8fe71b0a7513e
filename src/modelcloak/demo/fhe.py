"""Step 4, fhe and the owner backend: the device computes an encrypted result, the owner answers labels.

The owner protects the model with its last dense layer under CKKS (`--scheme fhe --cut-last 1`:
one affine layer, so no polynomial activation and no fine-tuning are needed), sets up the owner
backend with the same commands docs/OWNER.md gives (`owner init`, `owner model register
--fhe-secret`, a sim device, a licence with a quota) and starts a real `modelcloak serve` on
loopback. The device gets the model key by an attested release (`OwnerBackendKey`, INSECURE sim
evidence: the demo has no TPM quote to show) and asks for labels (`FheLabels`); the backend's
usage table then shows exactly the samples sent. The server is stopped when the step ends,
whatever happens.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from modelcloak.demo.context import INPUT_NAME, OUTPUT_NAME, DemoContext, DemoError, Row, StepResult, median_seconds

MODEL_ID = "mnist-demo"
DEVICE_ID = "demo-device"
_START_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serving(ctx: DemoContext, database: Path, master_key: Path) -> Iterator[str]:
    """`modelcloak serve` on a free loopback port until the block ends; yields its URL."""
    import httpx

    port = _free_port()
    log_path = database.parent / "serve.log"
    command = [sys.executable, "-m", "modelcloak", "serve", "--db", str(database)]
    command += ["--master-key-file", str(master_key), "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        with ctx.console.status(f"    starting modelcloak serve on {url} ..."):
            while True:
                if server.poll() is not None:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                    raise DemoError(f"modelcloak serve exited with status {server.returncode}: {tail[0]}")
                try:
                    if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise DemoError(f"modelcloak serve did not answer on {url} within {_START_TIMEOUT:.0f} s")
                time.sleep(0.2)
        ctx.console.print(f"    owner backend up on {url} (pid {server.pid}, log {ctx.shown(log_path)})")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        ctx.console.print(f"    owner backend stopped (pid {server.pid}, exit {server.returncode})")


def run(ctx: DemoContext) -> StepResult:
    import onnxruntime as ort

    import modelcloak
    from modelcloak.keys import KeyFile, generate_key_file
    from modelcloak.licensing.client import OwnerBackendKey, SimAttester
    from modelcloak.owner.evidence.sim import SimDevice
    from modelcloak.runtime.session import FheSession

    settings = ctx.settings
    plain = ctx.model()
    key_path = ctx.path("model.key")
    if not key_path.is_file():
        generate_key_file(key_path)
    owner = ctx.path("owner")
    owner.mkdir(parents=True, exist_ok=True)
    database, master, secret = owner / "owner.db", owner / "master.key", owner / "owner.fhe"
    device_key = ctx.path("devices/fhe-device.pem")
    device_key.parent.mkdir(parents=True, exist_ok=True)
    bundle = ctx.path("fhe.mcb")
    for stale in (database, master, device_key, secret):  # a rerun starts a fresh backend
        stale.unlink(missing_ok=True)

    ctx.console.print("    owner: protect --scheme fhe (last dense layer under CKKS), the CKKS secret kept apart")
    with ctx.console.status("    compiling the encrypted head ..."):
        modelcloak.protect(
            plain.path, bundle, key=KeyFile(key_path), scheme="fhe", cut=modelcloak.CutSelector(last=1),
            fhe=modelcloak.FheOptions(secret_out=secret),
        )  # fmt: skip
    measurement = hashlib.sha256(bundle.read_bytes()).hexdigest()
    db, master_flag = ["--db", str(database)], ["--master-key-file", str(master)]
    quota = 100_000
    ctx.console.print("    owner: init the backend, register the model and FHE secret, enrol a device, issue a licence")
    ctx.cli("owner", "init", *db, *master_flag)
    ctx.cli("owner", "model", "register", MODEL_ID, "--model-key-file", str(key_path), "--fhe-secret", str(secret),
            *db, *master_flag)  # fmt: skip
    identity = ctx.cli("owner", "sim-device", str(device_key)).strip().splitlines()[-1].strip()
    ctx.cli("owner", "device", "enroll", DEVICE_ID, "--kind", "sim", "--identity", identity,
            "-m", f"app={measurement}", *db, *master_flag)  # fmt: skip
    issued = ctx.cli("owner", "licence", "issue", "--model", MODEL_ID, "--device", DEVICE_ID,
                     "--quota", str(quota), "--allow-sim", *db, *master_flag)  # fmt: skip
    licence = issued.strip().splitlines()[-1].strip()
    if not licence.startswith("lic_"):
        raise DemoError(f"`owner licence issue` printed {licence!r}, not a licence id")

    x = plain.x_test[: settings.fhe_samples]
    one = x[:1]
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads
    reference = ort.InferenceSession(str(plain.path), options, providers=["CPUExecutionProvider"])
    sent = 0
    with serving(ctx, database, master) as url:
        provider = OwnerBackendKey(
            url, licence_id=licence, device_id=DEVICE_ID,
            attester=SimAttester(SimDevice(device_key), {"app": measurement}),
        )  # fmt: skip
        ctx.console.print(f"    device: key released after (sim) attestation; {len(x)} digits to the encrypted head")
        with modelcloak.load(
            bundle, key=provider, fhe_labels=modelcloak.FheLabels(owner / "labels.state"), threads=settings.threads
        ) as session:
            if not isinstance(session, FheSession):
                raise DemoError(f"{bundle} opened as a {type(session).__name__}, not an fhe session")
            answer = session.run({INPUT_NAME: x})[OUTPUT_NAME]
            sent += len(x)
            repeats = max(3, settings.latency_repeats // 5)
            plain_latency, encrypted_latency = median_seconds(
                lambda: reference.run(None, {INPUT_NAME: one}),
                lambda: session.evaluate({INPUT_NAME: one}),
                repeats=repeats,
            )
            began = time.perf_counter()
            session.run({INPUT_NAME: one})  # one digit, with the round trip to the owner
            round_trip = time.perf_counter() - began
            sent += 1
            result_bytes = len(session.evaluate({INPUT_NAME: one}))  # computed, never sent: not metered
        usage = _metered(ctx, database, licence)
    labels = np.asarray(answer)
    labels_only = bool(np.issubdtype(labels.dtype, np.integer) and labels.reshape(-1).size == len(x))
    labels = labels.reshape(-1)
    expected = plain.labels[: len(x)]
    equal = int(np.sum(labels == expected))
    accuracy = float(np.mean(labels == plain.y_test[: len(x)]))
    ctx.console.print(
        f"      {labels.dtype} labels from the owner, equal to plain on {equal}/{len(x)} digits; encrypted head "
        f"{encrypted_latency * 1e3:.0f} ms per digit (whole plain model {plain_latency * 1e3:.2f} ms), "
        f"round trip {round_trip * 1e3:.0f} ms; result {result_bytes:,} bytes"
    )
    ctx.console.print(f"      owner usage for {licence}: {usage} samples metered, {sent} sent")
    return StepResult(
        step="fhe",
        rows=[
            Row(
                "fhe (last layer; owner answers labels)",
                accuracy,
                encrypted_latency / plain_latency,
                "public layers and encrypted weights; labels only, each one metered",
                "the model key by attested release, and the owner's answer per query",
            )
        ],
        facts={
            "samples": len(x),
            "labels_equal": equal == len(x),
            "labels_equal_count": equal,
            "labels_only": labels_only,
            "fhe_accuracy": accuracy,
            "samples_sent": sent,
            "metered": usage,
            "licence": licence,
            "quota": quota,
            "plain_latency_ms": plain_latency * 1e3,
            "encrypted_head_ms": encrypted_latency * 1e3,
            "round_trip_ms": round_trip * 1e3,
            "result_bytes": result_bytes,
        },
        files={
            "fhe bundle": ctx.shown(bundle),
            "owner's CKKS secret (owner only)": ctx.shown(secret),
            "owner database": ctx.shown(database),
            "owner master key (secret)": ctx.shown(master),
            "sim device key (INSECURE)": ctx.shown(device_key),
            "server log": ctx.shown(owner / "serve.log"),
        },
        commands=[
            f"modelcloak protect {ctx.shown(plain.path)} -o {ctx.shown(bundle)} --scheme fhe --cut-last 1 "
            f"--key-file {ctx.shown(key_path)} --fhe-secret-out {ctx.shown(secret)} --force",
            f"modelcloak owner init --db {ctx.shown(database)} --master-key-file {ctx.shown(master)}",
            f"modelcloak owner model register {MODEL_ID} --model-key-file {ctx.shown(key_path)} "
            f"--fhe-secret {ctx.shown(secret)} --db {ctx.shown(database)} --master-key-file {ctx.shown(master)}",
            f"modelcloak owner sim-device {ctx.shown(device_key)}",
            f"modelcloak owner device enroll {DEVICE_ID} --kind sim --identity <printed> -m app={measurement[:8]}... "
            f"--db {ctx.shown(database)} --master-key-file {ctx.shown(master)}",
            f"modelcloak owner licence issue --model {MODEL_ID} --device {DEVICE_ID} --quota {quota} --allow-sim "
            f"--db {ctx.shown(database)} --master-key-file {ctx.shown(master)}",
            f"modelcloak serve --db {ctx.shown(database)} --master-key-file {ctx.shown(master)} --port 8443",
            f"modelcloak owner usage --db {ctx.shown(database)}",
        ],
    )


def _metered(ctx: DemoContext, database: Path, licence: str) -> int:
    """The samples the owner backend counted for `licence`, as `modelcloak owner usage --json` shows them."""
    import json

    rows = json.loads(ctx.cli("owner", "usage", "--licence", licence, "--db", str(database), "--json"))
    return int(sum(int(row["queries"]) for row in rows))
