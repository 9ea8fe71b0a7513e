"""A live owner backend for tests: `modelcloak serve` in a child process on loopback, plus an in-process
OwnerService on the same database for the owner's side (register, enrol, issue)."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from modelcloak.keys import KeyFile, generate_key_file
from modelcloak.licensing.client import OwnerClient, SimAttester, obtain_keys
from modelcloak.licensing.protocol import binding_digest
from modelcloak.owner.evidence.sim import SimDevice
from modelcloak.owner.service import OwnerService
from modelcloak.owner.store import MasterKey, Store

MEASUREMENT = {"app": "ab" * 32}
STARTUP_TIMEOUT = 120.0  # a hang guard: a loaded CI machine took over 30 s once


def release_body(device: SimDevice, licence: str, nonce: bytes) -> tuple[dict, X25519PrivateKey]:
    """A key-release request body from the sim `device` for `nonce`, and its ephemeral private key."""
    ephemeral = X25519PrivateKey.generate()
    public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    body = {
        "licence_id": licence,
        "device_id": "dev1",
        "instance_id": "i1",
        "nonce": base64.b64encode(nonce).decode(),
        "ephemeral_public_key": base64.b64encode(public).decode(),
        "evidence_kind": "sim",
        "evidence": base64.b64encode(device.evidence(binding_digest(nonce, public), MEASUREMENT)).decode(),
    }
    return body, ephemeral


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m modelcloak serve` in a child process; kill9() is a crash, start() again is a restart."""

    def __init__(
        self,
        database: str,
        master_key_file: Path,
        log: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.database = database
        self.extra_env = env or {}
        self.extra_args = args or []
        self.master_key_file = master_key_file
        self.log = log
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if "--tls-cert" in self.extra_args else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        command = [
            sys.executable,
            "-m",
            "modelcloak",
            "serve",
            "--db",
            self.database,
            "--master-key-file",
            str(self.master_key_file),
            "--port",
            str(self.port),
            *self.extra_args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.extra_env}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-1000:]}")
            try:
                # Only "is it up?": the tests check certificates themselves.
                if httpx.get(self.url + "/v1/health", timeout=1, verify=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not answer: {self.log.read_text()[-1000:]}")

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class Backend:
    def __init__(self, database: str, tmp: Path) -> None:
        self.tmp = tmp
        self.master_file = generate_key_file(tmp / "master.key").path
        self.service = OwnerService(Store(database), MasterKey.from_provider(KeyFile(self.master_file)))
        self.model_key_file = generate_key_file(tmp / "model.key")
        with self.model_key_file.key_for({}) as key:
            self.model_key = bytes(key.view())
        self.service.register_model("mnist", self.model_key)
        self.device = SimDevice.create(tmp / "device.pem")
        self.service.enroll_device("dev1", "sim", MEASUREMENT, identity=self.device.identity)
        self.attester = SimAttester(self.device, MEASUREMENT)
        self.server = ServerProcess(database, self.master_file, tmp / "server.log")

    def licence(self, **terms) -> str:
        terms.setdefault("device_id", "dev1")
        terms.setdefault("allow_sim", True)
        return self.service.issue_licence("mnist", **terms)

    def client(self) -> OwnerClient:
        return OwnerClient(self.server.url)

    def usage_key(self, licence: str) -> bytes:
        with self.client() as client:
            released = obtain_keys(
                client, licence_id=licence, device_id="dev1", instance_id="i1", attester=self.attester
            )
        released.model_key.close()
        return released.usage_key
