"""A software TPM (swtpm) on loopback, for development, demos and benchmarks without TPM hardware.

`SwTpm(state_dir).start()` runs ``swtpm socket --tpm2`` with its TPM state in `state_dir`: a second
instance on the same directory is the same TPM after a reboot, a fresh directory is another (or a
cleared) TPM. `tcti` is the connection string tpm2-pytss and tpm2-tools take. Needs the Debian
packages swtpm and swtpm-tools; nothing here is used on a real device.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from modelcloak.keys.errors import KeyProviderError

STARTUP_TIMEOUT = 10.0


def _free_port_pair() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 (swtpm's server and control channels)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s1, socket.socket() as s2:
                s1.bind(("127.0.0.1", port))
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise KeyProviderError("no two consecutive free loopback ports found for swtpm")


class SwTpm:
    """One swtpm process; a context manager (start on enter, stop on exit)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.state_dir.parent / f"{self.state_dir.name}.swtpm.log"

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> SwTpm:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):  # a port can be taken between the probe and swtpm's bind
            self.port = _free_port_pair()
            command = [
                "swtpm",
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--flags",
                "not-need-init,startup-clear",
            ]
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            if self._wait_ready():
                return self
            self.stop()
        raise KeyProviderError(f"swtpm did not start; see {self.log}: {self.log.read_text(errors='replace')[-500:]}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                # The control channel accepts and closes connections without touching TPM state.
                with socket.create_connection(("127.0.0.1", self.port + 1), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def __enter__(self) -> SwTpm:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def extend_pcr(tcti: str, index: int, data: bytes = b"modelcloak test measurement") -> None:
    """PCR_Extend(index, sha256(data)) on the sha256 bank, as a bootloader measuring a component would."""
    import hashlib

    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    with ESAPI(tcti) as ectx:
        digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=hashlib.sha256(data).digest()))
        ectx.pcr_extend(ESYS_TR.parse(f"PCR{index}"), TPML_DIGEST_VALUES([digest]))


def clear_tpm(tcti: str) -> None:
    """TPM2_Clear through the platform hierarchy (swtpm leaves it open): a new owner seed, as after a reset."""
    from tpm2_pytss import ESAPI, ESYS_TR

    with ESAPI(tcti) as ectx:
        ectx.clear(ESYS_TR.PLATFORM)
