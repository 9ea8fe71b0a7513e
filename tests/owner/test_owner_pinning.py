"""Certificate pinning between the device and the owner backend (issue 12, item 15), over real TLS.

A private CA made here issues two certificates for 127.0.0.1 with different keys; two `modelcloak
serve --tls-cert` processes on one database present one each. The device trusts the CA (SSL_CERT_FILE,
as docs/OWNER.md says), so without a pin both servers are accepted: that is the control showing
what the pin adds. With the first server's pin, the first is accepted and the second refused with
one line, before any request reaches it.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from owner_backend import Backend, ServerProcess

from modelcloak.keys import KeyProviderError
from modelcloak.licensing.client import OwnerBackendKey, OwnerClient, obtain_keys
from modelcloak.licensing.errors import OwnerError
from modelcloak.licensing.pinning import PinMismatch, certificate_pin, parse_pin


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _server_files(tmp: Path, name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> list[str]:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp / f"{name}.pem").write_bytes(_pem(_certificate(name, key, ca)))
    (tmp / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ["--tls-cert", str(tmp / f"{name}.pem"), "--tls-key", str(tmp / f"{name}.key")]


@pytest.mark.slow
def test_a_pinned_device_accepts_its_server_and_refuses_another_certificate_from_the_same_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (_certificate("modelcloak test CA", ca_key, None), ca_key)
    (tmp_path / "ca.pem").write_bytes(_pem(ca[0]))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))

    backend = Backend(str(tmp_path / "owner.db"), tmp_path)
    licence = backend.licence()
    genuine = ServerProcess(backend.server.database, backend.master_file, tmp_path / "genuine.log")
    genuine.extra_args = _server_files(tmp_path, "genuine", ca)
    impostor = ServerProcess(backend.server.database, backend.master_file, tmp_path / "impostor.log")
    impostor.extra_args = _server_files(tmp_path, "impostor", ca)
    pin = certificate_pin((tmp_path / "genuine.pem").read_bytes())
    genuine.start()
    impostor.start()
    try:

        def release(url: str, pin: str | None) -> bytes:
            with OwnerClient(url, pin=pin) as client:
                released = obtain_keys(
                    client, licence_id=licence, device_id="dev1", instance_id="i1", attester=backend.attester
                )
            with released.model_key as key:
                return bytes(key.view())

        # Controls: the CA alone accepts both servers, and the pin accepts the server it names.
        assert release(impostor.url, None) == backend.model_key
        assert release(genuine.url, pin) == backend.model_key

        nonces_before = _nonce_requests(impostor)
        with pytest.raises(PinMismatch) as refused:
            release(impostor.url, pin)
        line = str(refused.value)
        assert "\n" not in line and f"not the pinned {pin}" in line and "sha256:" in line.split("presented")[1]
        assert _nonce_requests(impostor) == nonces_before  # refused before the request was sent

        # The key provider `run --owner-url --owner-pin` uses: the same refusal, as its error type.
        provider = OwnerBackendKey(
            impostor.url, licence_id=licence, device_id="dev1", attester=backend.attester, pin=pin
        )
        with pytest.raises(KeyProviderError, match="not the pinned"):
            provider.key_for({})
        right = OwnerBackendKey(genuine.url, licence_id=licence, device_id="dev1", attester=backend.attester, pin=pin)
        with right.key_for({}) as key:
            assert bytes(key.view()) == backend.model_key
        with right.client() as client:  # what usage reports and FHE labels use: pinned too
            assert client.post("/v1/nonce", {"licence_id": licence})["nonce"]
    finally:
        impostor.stop()
        genuine.stop()
        backend.service.store.close()


def _nonce_requests(server: ServerProcess) -> float:
    """The server's count of nonce requests, from its /metrics (loopback may read it)."""
    text = httpx.get(server.url + "/metrics", verify=False).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("modelcloak_http_requests_total") and "/v1/nonce" in line
    )


def test_malformed_pins_and_pins_without_https_are_one_line_errors() -> None:
    for bad in ("abc", "sha256:xyz", "sha1:" + "0" * 40, "sha256:" + "0" * 63):
        with pytest.raises(OwnerError, match="must be sha256:<64 hex digits>"):
            parse_pin(bad)
    assert parse_pin("SHA256:" + "AB" * 32) == "sha256:" + "ab" * 32
    with pytest.raises(OwnerError, match="needs an https://"):
        OwnerClient("http://127.0.0.1:1", pin="sha256:" + "00" * 32)
    with pytest.raises(OwnerError, match="needs an https://"):
        OwnerBackendKey("http://127.0.0.1:1", licence_id="l", device_id="d", attester=None, pin="sha256:" + "00" * 32)


@pytest.mark.slow  # two CLI processes: about 6 s on the shared machine
def test_run_refuses_a_malformed_pin_and_a_pin_without_owner_url_with_one_line(tmp_path: Path) -> None:
    bundle, inputs = tmp_path / "m.mcb", tmp_path / "x.npy"
    bundle.write_bytes(b"x")
    np.save(inputs, np.zeros((1, 4), dtype=np.float32))
    common = [sys.executable, "-m", "modelcloak", "run", str(bundle), str(inputs), "--allow-unsigned"]
    cases = {
        "must be sha256:<64 hex digits>": [
            "--owner-url", "https://127.0.0.1:1", "--owner-pin", "sha256:zz", "--licence", "l", "--device-id", "d",
            "--attest", "sim", "--sim-key", str(tmp_path / "none.pem"),
        ],
        "give --owner-url too": ["--owner-pin", "sha256:" + "00" * 32, "--key-file", str(tmp_path / "k")],
    }  # fmt: skip
    for expected, extra in cases.items():
        done = subprocess.run([*common, *extra], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
