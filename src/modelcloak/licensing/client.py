"""The device side of the owner backend: attested key release as a key provider, and the usage reporter.

`OwnerBackendKey` is a `modelcloak.keys` provider: for each key it asks the backend for a nonce,
makes a fresh X25519 key pair, has its attester produce evidence over
binding_digest(nonce, ephemeral public key), and opens the HPKE-wrapped answer with the ephemeral
private key, which never leaves this process and is dropped afterwards. Besides the model key the
answer carries the licence's usage key, which `UsageReporter` uses to sign batches.

`UsageReporter` keeps its next sequence number and any batch not yet acknowledged in a small state
file, written (and fsynced) before a batch is sent, so a crash between sending and the answer
resends the same batch with the same number: the server acknowledges it again without counting it
twice. The runtime reports a batch before answering those queries (a reservation), so a refusal
(quota exhausted, licence revoked) stops it before the queries run.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from modelcloak.bundle.errors import BundleError
from modelcloak.bundle.serial import RollbackError, check_serial
from modelcloak.hygiene import SecureBuffer
from modelcloak.keys.errors import KeyProviderError
from modelcloak.keys.providers import KeyProvider, _into_secret
from modelcloak.licensing.errors import OwnerError
from modelcloak.licensing.protocol import (
    FHE_RESULT_REFUSED,
    HPKE_SUITE,
    MODEL_KEY_SIZE,
    USAGE_KEY_SIZE,
    RequestRefused,
    binding_digest,
    fhe_request_mac,
    release_info,
    usage_mac,
)

DEFAULT_TIMEOUT = 10.0

if TYPE_CHECKING:
    from modelcloak.owner.evidence.sim import SimDevice


class Attester(Protocol):
    """Produces evidence of one kind whose report data is `report_data`."""

    kind: str

    def evidence(self, report_data: bytes) -> bytes: ...


class SimAttester:
    """INSECURE development attester: a SimDevice key states these measurements about itself."""

    kind = "sim"

    def __init__(self, device: SimDevice, measurements: dict[str, str], *, debug: bool = False) -> None:
        self.device = device
        self.measurements = dict(measurements)
        self.debug = debug

    def evidence(self, report_data: bytes) -> bytes:
        return self.device.evidence(report_data, self.measurements, debug=self.debug)


class OwnerClient:
    """HTTP calls to the owner backend; a refusal becomes OwnerError with the server's reason."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        pin: str | None = None,
    ) -> None:
        """`pin`: `sha256:<hex>` of the server certificate's public key (licensing/pinning.py); any other
        certificate is refused before a request is sent."""
        if not url.startswith(("http://", "https://")):
            raise OwnerError(f"owner backend URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        if pin is not None:
            from modelcloak.licensing.pinning import parse_pin, pinned_transport

            transport = pinned_transport(self.url, parse_pin(pin))
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OwnerClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise OwnerError(f"owner backend {self.url} unreachable: {exc}") from None
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code != 200:
            reason = payload.get("error") if isinstance(payload, dict) else None
            raise RequestRefused(
                f"owner backend refused ({response.status_code}): {reason or response.text[:200]}", response.status_code
            )
        if not isinstance(payload, dict):
            raise OwnerError("owner backend answered with something other than a JSON object")
        return payload

    def nonce(self, licence_id: str) -> bytes:
        return base64.b64decode(self.post("/v1/nonce", {"licence_id": licence_id})["nonce"])


@dataclass
class ReleasedKeys:
    """What a granted release gave this process (the caller closes the buffers)."""

    model_key: SecureBuffer
    usage_key: bytes
    terms: dict[str, Any]


def obtain_keys(
    client: OwnerClient, *, licence_id: str, device_id: str, instance_id: str, attester: Attester
) -> ReleasedKeys:
    """One attested key release (nonce, evidence, HPKE unwrap)."""
    nonce = client.nonce(licence_id)
    ephemeral = X25519PrivateKey.generate()
    public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    evidence = attester.evidence(binding_digest(nonce, public))
    answer = client.post(
        "/v1/release",
        {
            "licence_id": licence_id,
            "device_id": device_id,
            "instance_id": instance_id,
            "nonce": base64.b64encode(nonce).decode(),
            "ephemeral_public_key": base64.b64encode(public).decode(),
            "evidence_kind": attester.kind,
            "evidence": base64.b64encode(evidence).decode(),
        },
    )
    try:
        wrapped = base64.b64decode(answer["wrapped_key"], validate=True)
        plain = bytearray(HPKE_SUITE.decrypt(wrapped, ephemeral, info=release_info(licence_id, nonce)))
    except Exception:  # InvalidTag, KeyError, binascii.Error: all mean the same to the device
        raise OwnerError("owner backend's wrapped key does not open with this request's key and nonce") from None
    if len(plain) != MODEL_KEY_SIZE + USAGE_KEY_SIZE:
        raise OwnerError("owner backend's wrapped key has the wrong length")
    usage_key = bytes(plain[MODEL_KEY_SIZE:])
    model_key = _into_secret(plain[:MODEL_KEY_SIZE])
    plain[:] = bytes(len(plain))
    terms = {k: v for k, v in answer.items() if k != "wrapped_key"}
    return ReleasedKeys(model_key, usage_key, terms)


class OwnerBackendKey(KeyProvider):
    """Key provider: the model key comes from the owner backend after attestation (device side only)."""

    name = "owner"

    def __init__(
        self,
        url: str,
        *,
        licence_id: str,
        device_id: str,
        attester: Attester,
        instance_id: str | None = None,
        pin: str | None = None,
    ) -> None:
        """`pin`: the backend certificate's `sha256:<hex>` SPKI pin; every connection of this provider
        and of the usage reporting that uses its keys checks it (see `client()`)."""
        if pin is not None:
            from modelcloak.licensing.pinning import parse_pin, pinned_transport

            pin = parse_pin(pin)
            pinned_transport(url, pin)  # an http:// URL with a pin is refused here, not at the first release
        self.url = url
        self.pin = pin
        self.licence_id = licence_id
        self.device_id = device_id
        self.attester = attester
        # One device installation is one instance, however often it restarts (a random id per process
        # used up an instance licence's slots); processes that must count separately pass their own.
        self.instance_id = instance_id or device_id
        self.usage_key: bytes | None = None
        self.terms: dict[str, Any] = {}
        self._bundle: tuple[dict[str, Any], str | None] | None = None

    def pin_bundle(self, document: dict[str, Any], signer: str | None) -> None:
        """Name the bundle this provider releases keys for: its manifest and its pinned, verified signer
        (None when no signer is pinned). From then on a licence whose `min_serial` is newer than the
        bundle's serial is refused before the key leaves this provider, at the first release and at
        every revalidation. `load()` calls this."""
        self._bundle = (document, signer)

    def describe(self) -> str:
        insecure = " (INSECURE sim evidence)" if self.attester.kind == "sim" else ""
        return f"owner backend {self.url}, licence {self.licence_id}{insecure}"

    def new_key(self) -> tuple[SecureBuffer, dict[str, Any]]:
        raise KeyProviderError(
            "the owner backend releases keys, it does not make them: seal with a key file, then "
            "`modelcloak owner model register` that key"
        )

    def key_for(self, spec: dict[str, Any]) -> SecureBuffer:
        try:
            return self._release()
        except OwnerError as exc:
            raise KeyProviderError(str(exc)) from None

    def client(self) -> OwnerClient:
        """A client for this provider's backend, with its certificate pin (usage reports, FHE labels)."""
        return OwnerClient(self.url, pin=self.pin)

    def _release(self) -> SecureBuffer:
        """One attested release; keeps the usage key and terms, returns the model key (caller closes it)."""
        with self.client() as client:
            released = obtain_keys(
                client,
                licence_id=self.licence_id,
                device_id=self.device_id,
                instance_id=self.instance_id,
                attester=self.attester,
            )
        try:
            self._check_pin(released.terms)
        except BaseException:
            released.model_key.close()
            raise
        self.usage_key = released.usage_key
        self.terms = released.terms
        return released.model_key

    def _check_pin(self, terms: dict[str, Any]) -> None:
        """Refuse a bundle older than the licence's pinned serial (RollbackError), as the device's own `min_serial`."""
        pinned = terms.get("min_serial")
        if pinned is None:
            return
        if self._bundle is None:
            raise RollbackError(
                f"licence {self.licence_id} pins bundle serial {pinned}, but the bundle is unknown to this key "
                "provider: open it with modelcloak.load(), which checks its serial"
            )
        document, signer = self._bundle
        try:
            check_serial(document, pinned, signer)
        except BundleError as exc:
            raise RollbackError(f"licence {self.licence_id} pins serial {pinned}: {exc}") from None

    def _deadline(self, name: str) -> datetime:
        try:
            return datetime.fromisoformat(self.terms[name])
        except (KeyError, TypeError, ValueError):
            raise OwnerError("no licence terms yet: obtain the key first") from None

    def revalidate(self, now: datetime | None = None) -> bool:
        """Release again (fresh evidence) when revalidation is due; what a running session calls periodically.

        Returns True when the backend confirmed the licence (or it was not due yet), False while the
        backend is unreachable but the offline grace has not run out. Raises OwnerError when the
        backend refuses (revoked, expired, quota, changed measurements) or the grace is over: the
        caller must then stop using the key.
        """
        now = now or datetime.now(UTC)
        if now < self._deadline("revalidate_at"):
            return True
        offline_until = self._deadline("offline_until")
        try:
            model_key = self._release()
        except RollbackError as exc:  # the owner raised the pin above this bundle while it ran
            raise RequestRefused(str(exc), 403) from None
        except RequestRefused:
            raise
        except OwnerError as exc:
            if now < offline_until:
                return False
            raise OwnerError(
                f"licence {self.licence_id} could not be revalidated and its offline grace ended at "
                f"{offline_until.isoformat()} ({exc})"
            ) from None
        model_key.close()
        return True


class UsageReporter:
    """Signed, sequence-numbered usage batches for one (licence, reporter), surviving restarts."""

    def __init__(
        self,
        client: OwnerClient,
        *,
        licence_id: str,
        reporter_id: str,
        usage_key: bytes,
        state_path: str | Path,
    ) -> None:
        if len(usage_key) != USAGE_KEY_SIZE:
            raise OwnerError(f"a usage key is {USAGE_KEY_SIZE} bytes")
        self.client = client
        self.licence_id = licence_id
        self.reporter_id = reporter_id
        self._key = bytes(usage_key)
        self.state_path = Path(state_path)
        self._state = self._load()

    def _load(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {"licence": self.licence_id, "reporter": self.reporter_id, "next": 1, "pending": None}
        except (OSError, ValueError) as exc:
            raise OwnerError(f"usage state {self.state_path} is unreadable ({exc}); it holds unsent counts") from None
        if state.get("licence") != self.licence_id or state.get("reporter") != self.reporter_id:
            raise OwnerError(f"usage state {self.state_path} belongs to another licence or reporter")
        return state

    def _save(self) -> None:
        temporary = self.state_path.with_name(self.state_path.name + ".tmp")
        with open(temporary, "w") as handle:
            json.dump(self._state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.state_path)

    @property
    def has_pending(self) -> bool:
        """A batch was sent (or was about to be) and is not acknowledged yet."""
        return self._state.get("pending") is not None

    @property
    def next_sequence(self) -> int:
        return int(self._state["next"])

    def flush(self) -> dict[str, Any] | None:
        """Resend the batch left unacknowledged by a crash or a network error, if any."""
        pending = self._state.get("pending")
        if pending is None:
            return None
        return self._send(int(pending["sequence"]), int(pending["queries"]))

    def report(self, queries: int) -> dict[str, Any]:
        """Report `queries` more queries (plus any deferred ones); returns the server's acknowledgement."""
        self.flush()
        sequence = self.next_sequence
        queries += int(self._state.get("unsent", 0))
        self._state["pending"] = {"sequence": sequence, "queries": queries}
        self._state["unsent"] = 0
        self._save()
        return self._send(sequence, queries)

    def defer(self, queries: int) -> None:
        """Keep `queries` (run while the backend was unreachable) in the state file for the next batch."""
        self._state["unsent"] = int(self._state.get("unsent", 0)) + queries
        self._save()

    def _send(self, sequence: int, queries: int) -> dict[str, Any]:
        mac = usage_mac(self._key, self.licence_id, self.reporter_id, sequence, queries)
        body = {
            "licence_id": self.licence_id,
            "reporter_id": self.reporter_id,
            "sequence": sequence,
            "queries": queries,
            "mac": base64.b64encode(mac).decode(),
        }
        try:
            ack = self.client.post("/v1/usage", body)
        except RequestRefused as exc:
            if exc.status == 403:  # a policy refusal (quota, licence): not counted, so not owed either
                self._state["pending"] = None
                self._save()
            raise
        self._state["pending"] = None
        self._state["next"] = sequence + 1
        self._save()
        return ack


class FheLabelClient(UsageReporter):
    """Sends encrypted results to the owner's decryption service and gets labels back.

    Each request is a usage batch of its sample count on this reporter's own sequence stream, so it
    is metered exactly once like a usage report. The result waits next to the state file until it
    is acknowledged: after a crash, `flush()` resends the same request, which the server answers
    again without counting it twice.
    """

    @property
    def _result_path(self) -> Path:
        return self.state_path.with_name(self.state_path.name + ".result")

    def labels(self, result: bytes, *, queries: int, top_k: int = 1) -> list[Any]:
        """Labels (or top-k class lists) for the `queries` samples in `result`."""
        self.flush()
        sequence = self.next_sequence
        temporary = self._result_path.with_name(self._result_path.name + ".tmp")
        with open(temporary, "wb") as handle:
            handle.write(result)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self._result_path)
        self._state["pending"] = {"sequence": sequence, "queries": queries, "top_k": top_k}
        self._save()
        return list(self._send(sequence, queries)["labels"])

    def _send(self, sequence: int, queries: int) -> dict[str, Any]:
        top_k = int((self._state.get("pending") or {}).get("top_k", 1))
        try:
            result = self._result_path.read_bytes()
        except FileNotFoundError:
            raise OwnerError(f"the pending encrypted result {self._result_path} is missing") from None
        mac = fhe_request_mac(self._key, self.licence_id, self.reporter_id, sequence, queries, result)
        body = {
            "licence_id": self.licence_id,
            "reporter_id": self.reporter_id,
            "sequence": sequence,
            "queries": queries,
            "mac": base64.b64encode(mac).decode(),
            "result": base64.b64encode(result).decode(),
            "top_k": top_k,
        }
        try:
            answer = self.client.post("/v1/fhe/labels", body)
        except RequestRefused as exc:
            if exc.status == 422 and FHE_RESULT_REFUSED in str(exc):  # refused and counted: sequence used
                self._finish(sequence + 1)
            elif exc.status in (400, 401, 403, 404, 422):  # refused before counting: nothing is owed
                self._finish(None)
            raise
        self._finish(sequence + 1)
        return answer

    def _finish(self, next_sequence: int | None) -> None:
        self._state["pending"] = None
        if next_sequence is not None:
            self._state["next"] = next_sequence
        self._save()
        self._result_path.unlink(missing_ok=True)
