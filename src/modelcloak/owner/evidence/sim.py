"""The `sim` evidence format: INSECURE, for development and tests only.

There is no hardware behind it. A "simulated device" holds an Ed25519 key in an ordinary file and
signs a statement of its own measurements; anyone with root on that device can sign anything.
What it does give is the shape of real attestation, so the key-release path, licence policy and
tamper detection run end to end on any machine: a changed byte in the statement, or a statement
signed by a key other than the enrolled one, is refused. The service refuses `sim` evidence
unless a licence explicitly allows it, and every claim it produces carries `insecure=True`.

Evidence bytes (CBOR): a map {"format": "modelcloak-sim-v1", "statement": bytes, "public_key":
32 bytes (raw Ed25519), "signature": 64 bytes}. The signature covers
SIGNING_LABEL || statement; statement is CBOR {"report_data": bytes, "measurements": {name: hex},
"debug": bool}. The claims' identity is the SHA-256 of the raw public key (hex), which the service
compares with the identity enrolled for the device.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelcloak.owner.evidence.base import Claims, EvidenceError

FORMAT = "modelcloak-sim-v1"
SIGNING_LABEL = b"modelcloak sim evidence v1 (INSECURE)\x00"
MAX_EVIDENCE = 64 * 1024
_HEX = re.compile(r"^[0-9a-f]{2,256}$")
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def identity_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


class SimVerifier:
    """Checks the Ed25519 signature of sim evidence. Authentic here means "signed by that key", nothing more."""

    kind = "sim"

    def verify(self, evidence: bytes, *, now: datetime) -> Claims:
        if len(evidence) > MAX_EVIDENCE:
            raise EvidenceError(f"sim evidence is {len(evidence)} bytes, more than the {MAX_EVIDENCE} accepted")
        outer = _loads(evidence, "sim evidence")
        if not isinstance(outer, dict) or outer.get("format") != FORMAT:
            raise EvidenceError(f"sim evidence is not a {FORMAT} document")
        statement, raw_key, signature = outer.get("statement"), outer.get("public_key"), outer.get("signature")
        if not (isinstance(statement, bytes) and isinstance(raw_key, bytes) and isinstance(signature, bytes)):
            raise EvidenceError("sim evidence lacks its statement, public key or signature bytes")
        try:
            public_key = Ed25519PublicKey.from_public_bytes(raw_key)
            public_key.verify(signature, SIGNING_LABEL + statement)
        except (InvalidSignature, ValueError):
            raise EvidenceError("sim evidence signature does not verify: the statement was changed or forged") from None
        body = _loads(statement, "sim statement")
        if not isinstance(body, dict):
            raise EvidenceError("sim statement is not a map")
        report_data, measurements, debug = body.get("report_data"), body.get("measurements"), body.get("debug")
        if not isinstance(report_data, bytes) or not 32 <= len(report_data) <= 64:
            raise EvidenceError("sim statement's report_data must be 32 to 64 bytes")
        if not isinstance(debug, bool):
            raise EvidenceError("sim statement's debug flag must be true or false")
        if not isinstance(measurements, dict) or not all(
            isinstance(k, str) and _NAME.match(k) and isinstance(v, str) and _HEX.match(v)
            for k, v in measurements.items()
        ):
            raise EvidenceError("sim statement's measurements must map short names to lowercase hex")
        return Claims(
            kind=self.kind,
            measurements=dict(measurements),
            report_data=report_data,
            debug=debug,
            insecure=True,
            identity=identity_of(public_key),
            details={"warning": "sim evidence: no hardware root of trust, development only"},
        )


def _loads(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError):
        raise EvidenceError(f"{what} is not valid CBOR") from None


class SimDevice:
    """The device side of `sim`: an Ed25519 key in a file (mode 0600) that signs statements. INSECURE."""

    def __init__(self, key_path: str | Path) -> None:
        self.key_path = Path(key_path)
        try:
            loaded = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except FileNotFoundError:
            raise EvidenceError(
                f"sim device key {self.key_path} does not exist (create it with SimDevice.create)"
            ) from None
        except ValueError:
            raise EvidenceError(f"sim device key {self.key_path} is not a PEM private key") from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise EvidenceError(f"sim device key {self.key_path} is not an Ed25519 key")
        self._key = loaded

    @classmethod
    def create(cls, key_path: str | Path) -> SimDevice:
        path = Path(key_path)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise EvidenceError(f"{path} already exists; refusing to overwrite a device key") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        return cls(path)

    @property
    def identity(self) -> str:
        return identity_of(self._key.public_key())

    def evidence(self, report_data: bytes, measurements: dict[str, str], *, debug: bool = False) -> bytes:
        statement = cbor2.dumps({"report_data": report_data, "measurements": measurements, "debug": debug})
        return cbor2.dumps(
            {
                "format": FORMAT,
                "statement": statement,
                "public_key": self._key.public_key().public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                ),
                "signature": self._key.sign(SIGNING_LABEL + statement),
            }
        )
