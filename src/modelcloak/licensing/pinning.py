"""Certificate pinning for the device's connections to the owner backend.

A pin is `sha256:<64 hex digits>`, the SHA-256 of the server certificate's SubjectPublicKeyInfo
(DER), the same value as `openssl x509 -in cert.pem -pubkey -noout | openssl pkey -pubin -outform
DER | sha256sum`, or `modelcloak.licensing.pinning.certificate_pin(pem)`. With a pin the client
checks it on every new TLS connection, right after the handshake and before a byte of the request
is sent, and refuses any other key. The pin is *in addition to* the usual checks (certificate
chain to a trusted CA, e.g. a private one through SSL_CERT_FILE, and host name): a certificate
from the right CA but with another key, such as one a compromised or careless CA issued for the same
name, is refused.
"""

from __future__ import annotations

import hashlib
import re
import typing
from typing import Any

import httpcore
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from modelcloak.licensing.errors import OwnerError

_PIN = re.compile(r"^sha256:([0-9a-f]{64})$")


class PinMismatch(OwnerError):
    """The server's certificate key is not the pinned one (raised before the request is sent)."""


def parse_pin(text: str) -> str:
    """The pin in canonical form (lower-case hex); one clear line when it is malformed."""
    canonical = text.strip().lower()
    if not _PIN.match(canonical):
        raise OwnerError(f"certificate pin must be sha256:<64 hex digits> (SPKI SHA-256), got {text!r}")
    return canonical


def spki_pin(certificate_der: bytes) -> str:
    """The pin of a DER certificate: SHA-256 over its SubjectPublicKeyInfo."""
    spki = (
        x509.load_der_x509_certificate(certificate_der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def certificate_pin(pem: bytes) -> str:
    """The pin of a PEM certificate (the first one in `pem`)."""
    return spki_pin(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER))


class _PinnedStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, pin: str, where: str) -> None:
        self._stream, self._pin, self._where = stream, pin, where

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        secured = self._stream.start_tls(ssl_context, server_hostname, timeout)
        tls = secured.get_extra_info("ssl_object")
        der = tls.getpeercert(True) if tls is not None else None  # positional: some ssl objects take no keywords
        presented = spki_pin(der) if der else "no certificate"
        if presented != self._pin:
            secured.close()
            raise PinMismatch(
                f"owner backend {self._where} presented certificate key {presented}, "
                f"not the pinned {self._pin}: refused"
            )
        return secured


class _PinningBackend(httpcore.NetworkBackend):
    def __init__(self, pin: str, where: str) -> None:
        self._inner = httpcore.SyncBackend()
        self._pin, self._where = pin, where

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _PinnedStream(stream, self._pin, self._where)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def pinned_transport(url: str, pin: str) -> httpx.HTTPTransport:
    """An httpx transport that verifies certificates as usual (SSL_CERT_FILE honoured) and then the pin.

    Connections go straight to the backend (no proxy from the environment): a TLS-terminating proxy
    would present its own key, which the pin is there to refuse."""
    if not url.startswith("https://"):
        raise OwnerError(f"a certificate pin needs an https:// owner backend URL, got {url!r}")
    transport = httpx.HTTPTransport()
    context = httpx.create_ssl_context()
    # The pool is rebuilt around a network backend that checks the pin after each TLS handshake;
    # httpx keeps mapping the pool's errors as for its own.
    transport._pool = httpcore.ConnectionPool(ssl_context=context, network_backend=_PinningBackend(pin, url))
    return transport
