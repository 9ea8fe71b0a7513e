"""Device side: open a sealed bundle and run it, with plaintext only in memory.

Order matters and is the security argument: caches are neutralised and the process hardened
before any runtime initialises; the signature is checked before anything is decrypted; the key is
checked against the header MAC before the sections; decrypted bytes live in buffers that are
excluded from core dumps and wiped as soon as the backend holds its own copy.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from modelcloak import hygiene
from modelcloak.bundle import Bundle
from modelcloak.bundle.signing import load_public_key
from modelcloak.keys import KeyProvider
from modelcloak.runtime import cacheguard
from modelcloak.runtime.backends import BACKENDS, OpenVinoBackend, OrtBackend
from modelcloak.runtime.errors import SessionError


@dataclass
class LoadReport:
    """What happened while loading, for `modelcloak run --verbose` and the benchmarks."""

    signer: str | None = None
    key_id: str = ""
    backend: str = ""
    providers: list[str] = field(default_factory=list)
    cache_findings: int = 0
    hardening: dict[str, bool] = field(default_factory=dict)
    buffer_kinds: dict[str, str] = field(default_factory=dict)
    # VmFlags of each buffer's mapping read from /proc/self/smaps while it held plaintext.
    buffer_flags: dict[str, set[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class SealedSession:
    """A loaded protected model. `run` takes a dict of arrays (or one array for one input)."""

    def __init__(self, backend: Any, manifest_document: dict[str, Any], report: LoadReport) -> None:
        self._backend = backend
        self.manifest = manifest_document
        self.report = report
        # Names come from the signed manifest: OpenVINO may rename tensors when it folds nodes.
        signature = manifest_document.get("model", {})
        self.input_names: list[str] = [s["name"] for s in signature.get("inputs", [])] or list(backend.input_names)
        self.output_names: list[str] = [s["name"] for s in signature.get("outputs", [])] or list(backend.output_names)
        self._input_dtypes = {
            spec["name"]: np.dtype(spec["dtype"]) for spec in manifest_document.get("model", {}).get("inputs", [])
        }
        self.licence: Any = None  # a runtime.metering.LicensedUse when the key came from the owner backend

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        feeds = self._feeds(inputs)
        if self.licence is None:
            return self._compute(feeds)
        first = feeds[self.input_names[0]] if self.input_names else next(iter(feeds.values()))
        samples = int(first.shape[0]) if first.ndim else 1
        self.licence.before(samples)  # with a quota, reserves the samples: refused means nothing is answered
        results = self._compute(feeds)
        self.licence.after(samples)
        return results

    def _feeds(self, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Check names and dtypes against the signed manifest; contiguous arrays by input name."""
        if self._backend is None:
            raise SessionError("session is closed")
        if not isinstance(inputs, dict):
            if len(self.input_names) != 1:
                raise SessionError(
                    f"model has {len(self.input_names)} inputs ({', '.join(self.input_names)}); pass a dict"
                )
            inputs = {self.input_names[0]: inputs}
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [n for n in inputs if n not in self.input_names]
        if missing or unknown:
            raise SessionError(
                "input names do not match the model: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {', '.join(missing)}" if missing else "",
                        f"unknown {', '.join(unknown)}" if unknown else "",
                    )
                    if part
                )
            )
        feeds = {}
        for name, value in inputs.items():
            array = np.asarray(value)
            expected = self._input_dtypes.get(name)
            if expected is not None and array.dtype != expected:
                if not np.can_cast(array.dtype, expected, casting="same_kind"):
                    raise SessionError(f"input {name!r} must be {expected.name}, got {array.dtype.name}")
                array = array.astype(expected)
            feeds[name] = np.ascontiguousarray(array)
        return feeds

    def _compute(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self._backend.run(feeds)))

    def close(self) -> None:
        try:
            if self.licence is not None:
                licence, self.licence = self.licence, None
                licence.close()  # the last usage batch
        finally:
            if self._backend is not None:
                self._backend.close()
                self._backend = None

    def __enter__(self) -> "SealedSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SplitSession(SealedSession):
    """A split bundle: the public part runs here, the private part in the enclave process.

    The host sees the boundary tensors and whatever the enclave's output policy returns
    (labels by default), never the private part's weights or graph.
    """

    def __init__(self, backend: Any, enclave: Any, manifest_document: dict[str, Any], report: LoadReport) -> None:
        super().__init__(backend, manifest_document, report)
        self.enclave = enclave
        self._boundary = [spec["name"] for spec in manifest_document.get("split", {}).get("boundary", [])]
        self._public_outputs = list(backend.output_names)
        self.output_names = list(enclave.info.output_names)

    def boundary(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the public part: the tensors that cross to the enclave (what the host can see)."""
        public = dict(zip(self._public_outputs, self._backend.run(feeds)))
        # A graph input that only the private part reads crosses the boundary unchanged.
        return {name: public[name] if name in public else feeds[name] for name in self._boundary}

    def _compute(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.enclave.infer(self.boundary(feeds))

    def close(self) -> None:
        super().close()
        if self.enclave is not None:
            self.enclave.close()
            self.enclave = None


class FheSession(SealedSession):
    """The public part runs here; the private dense head runs encrypted (CKKS) on its output.

    Nothing here can decrypt: `evaluate` returns the result envelope (bytes) that only the owner
    backend's decryption service turns into labels (`modelcloak serve`, docs/FHE.md).
    """

    def __init__(self, backend: Any, evaluator: Any, manifest_document: dict[str, Any], report: LoadReport) -> None:
        super().__init__(backend, manifest_document, report)
        self.evaluator = evaluator

    def features(self, feeds: dict[str, np.ndarray] | np.ndarray) -> np.ndarray:
        """The public part's output (the encrypted head's input), in plaintext on this device.

        Not metered here: the owner's decryption service counts each sample it decrypts.
        """
        return next(iter(self._compute(self._feeds(feeds)).values()))

    def evaluate(self, feeds: dict[str, np.ndarray] | np.ndarray, *, encrypt_features: bool = False) -> bytes:
        """Public part, then the encrypted head; the returned envelope goes to the owner backend."""
        from modelcloak.fhe import FheError

        features = self.features(feeds)
        try:
            return self.evaluator.evaluate(features.reshape(features.shape[0], -1), encrypt_features=encrypt_features)
        except FheError as exc:
            raise SessionError(f"encrypted head: {exc}") from None

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        raise SessionError(
            "an fhe bundle's outputs are encrypted: use evaluate() and the owner backend's decryption service"
        )


_PREFIXES = {"seal": "", "split": "public.", "lock": "", "fhe": "public."}


def load(
    bundle: str | Path,
    *,
    key: KeyProvider,
    backend: str = "onnxruntime",
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
    device: str = "CPU",
    threads: int | None = None,
    trusted_signers: Sequence[bytes | str | Path] | None = None,
    require_signature: bool = False,
    cache_policy: str = "override",
    session_config: dict[str, Any] | None = None,
    enclave_key_file: str | Path | None = None,
    enclave_key_env: str | None = None,
    enclave_threads: int | None = None,
    enclave_timeout: float = 10.0,
    device_key: Any = None,
) -> SealedSession:
    """Open a protected bundle with a key from `key` and return a session ready to run.

    `trusted_signers` (public keys or PEM files) makes the owner signature mandatory and pins who
    may have signed. `session_config` sets onnxruntime SessionOptions attributes or config
    entries. `cache_policy` is "override" (neutralise caches, warn), "strict" (refuse to start
    when a cache is enabled) or "off" (unsafe; for tests that prove leaks are detectable).

    Split bundles also start the enclave process, which reads its own key from
    `enclave_key_file` or `enclave_key_env`; this process never sees that key.

    Bundles locked to devices need `device_key`, this device's key
    (`modelcloak.keys.open_device_key(state_dir)`): the weights are unlocked in memory with it.
    """
    if backend not in BACKENDS:
        raise SessionError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    report = LoadReport(backend=backend)
    clock = time.perf_counter
    started = clock()
    report.cache_findings = len([f for f in cacheguard.apply(cache_policy) if f.risk])
    report.hardening = hygiene.harden_process()
    trusted = [load_public_key(s) if not isinstance(s, bytes) else s for s in trusted_signers or []]

    with Bundle.open(bundle) as sealed:
        scheme = sealed.manifest.scheme
        if scheme not in _PREFIXES:
            raise SessionError(f"bundle scheme {scheme!r} cannot be loaded by this version of modelcloak")
        if scheme == "split" and not (enclave_key_file or enclave_key_env):
            raise SessionError(
                "this is a split bundle: give the enclave its key (--enclave-key-file or --enclave-key-env)"
            )
        lock = sealed.manifest.document.get("lock")
        if lock is not None and device_key is None:
            raise SessionError("this bundle is locked to a device: give this device's key (--device-state DIR)")
        report.signer = sealed.verify_signature(trusted or None, require=require_signature)
        report.seconds["verify"] = clock() - started
        extra_sections: dict[str, bytes] = {"fhe": b""} if scheme == "fhe" else {}
        runner = _open_graph(
            sealed,
            key,
            _PREFIXES[scheme],
            report,
            backend=backend,
            providers=providers,
            device=device,
            threads=threads,
            cache_policy=cache_policy,
            session_config=session_config,
            lock=lock,
            device_key=device_key,
            also=extra_sections,
        )
        if scheme == "split":
            header, private = sealed.header, sealed.section_ciphertext("private")
    if scheme == "fhe":
        from modelcloak.fhe import EdgeEvaluator, FheError

        try:
            evaluator = EdgeEvaluator(extra_sections["fhe"])
        except FheError as exc:
            runner.close()
            raise SessionError(f"cannot load the encrypted head: {exc}") from None
        report.providers = list(runner.providers)
        report.seconds["total"] = clock() - started
        return FheSession(runner, evaluator, sealed.manifest.document, report)
    if scheme != "split":
        report.providers = list(runner.providers)
        report.seconds["total"] = clock() - started
        return SealedSession(runner, sealed.manifest.document, report)

    from modelcloak.runtime.enclave_client import EnclaveClient

    key_args = ["--key-file", str(enclave_key_file)] if enclave_key_file else ["--key-env", str(enclave_key_env)]
    mark = clock()
    enclave = EnclaveClient()
    try:
        enclave.start(key_args, threads=enclave_threads)
        enclave.load(header, private, timeout=max(enclave_timeout, 30.0))
    except BaseException:
        enclave.close()
        runner.close()
        raise
    del private
    report.seconds["enclave_start"] = clock() - mark
    report.providers = list(runner.providers)
    report.seconds["total"] = clock() - started
    return SplitSession(runner, enclave, sealed.manifest.document, report)


def _open_graph(
    sealed: Bundle,
    key: KeyProvider,
    prefix: str,
    report: LoadReport,
    *,
    backend: str,
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None,
    device: str,
    threads: int | None,
    cache_policy: str,
    session_config: dict[str, Any] | None,
    lock: dict[str, Any] | None = None,
    device_key: Any = None,
    also: dict[str, bytes] | None = None,
) -> Any:
    """Decrypt `<prefix>graph` and `<prefix>weights` into wiped, non-dumpable buffers and build a backend.

    A locked part also has `<prefix>locked` (codes) and `<prefix>lock-params`: the codes are
    unlocked with the device's key into the back of the weights buffer (modelcloak.lock.layout).
    Sections named in `also` (public material, e.g. the FHE edge package) are decrypted into it
    with the same key, so the key is derived once.
    """
    clock = time.perf_counter
    master = key.key_for(sealed.manifest.key)
    graph_buffer = weights_buffer = None
    if lock is not None and lock.get("part") != prefix:
        raise SessionError(f"the bundle locks part {lock.get('part')!r}, which this version cannot load")
    try:
        report.buffer_kinds["key"] = master.kind
        sealed.check_key(master.view())
        report.key_id = sealed.manifest.key_id
        graph_entry = sealed.manifest.section(prefix + "graph")
        weights_entry = sealed.manifest.section(prefix + "weights")
        graph_buffer = hygiene.weights_buffer(graph_entry.size)
        weights_size = weights_entry.size if lock is None else _locked_weights_size(lock, weights_entry.size)
        weights_buffer = hygiene.weights_buffer(weights_size)
        report.buffer_kinds["weights"] = weights_buffer.kind
        mark = clock()
        sealed.decrypt_section_into(graph_entry.name, master.view(), graph_buffer.view())
        plain_part = weights_buffer.view()[: weights_entry.size]  # a locked part leaves room for the unlocked
        try:
            sealed.decrypt_section_into(weights_entry.name, master.view(), plain_part)
        finally:
            plain_part.release()  # a live slice would keep the buffer from being unmapped on failure
        report.seconds["decrypt"] = clock() - mark
        report.buffer_flags = _flags_of({"key": master, "weights": weights_buffer, "graph": graph_buffer})
        if lock is not None:
            mark = clock()
            _unlock(sealed, master, prefix, lock, device_key, weights_buffer)
            report.seconds["unlock"] = clock() - mark
        for name in also or {}:
            entry = sealed.manifest.section(name)
            data = bytearray(entry.size)
            sealed.decrypt_section_into(name, master.view(), memoryview(data))
            also[name] = bytes(data)  # type: ignore[index]
        master.close()
        graph = _parse_graph(graph_buffer.view())
        mark = clock()
        weights_view = weights_buffer.view()
        try:
            if backend == "onnxruntime":
                runner: Any = OrtBackend(
                    graph,
                    weights_view,
                    providers=providers,
                    threads=threads,
                    cache_policy=cache_policy,
                    session_config=session_config,
                )
            else:
                runner = OpenVinoBackend(graph, weights_view, device=device, cache_policy=cache_policy)
        finally:
            weights_view.release()
        report.seconds["build"] = clock() - mark
        return runner
    finally:
        master.close()
        for buffer in (graph_buffer, weights_buffer):
            if buffer is not None:
                buffer.close()


def _locked_weights_size(lock: dict[str, Any], plain_size: int) -> int:
    size = lock.get("weights_size")
    if not isinstance(size, int) or size < plain_size:
        raise SessionError("the bundle's lock entry has no valid weights_size")
    return size


def _unlock(
    sealed: Bundle, master: hygiene.SecureBuffer, prefix: str, lock: dict[str, Any], device_key: Any, weights: Any
) -> None:
    """Decrypt the locked codes and unlock them with this device's key into the weights buffer."""
    from modelcloak.keys.device import unwrap_lock_key
    from modelcloak.lock import LockError
    from modelcloak.lock.layout import unlock_into

    codes_entry = sealed.manifest.section(prefix + "locked")
    params_entry = sealed.manifest.section(prefix + "lock-params")
    params_bytes = bytearray(params_entry.size)
    sealed.decrypt_section_into(params_entry.name, master.view(), memoryview(params_bytes))
    try:
        params = json.loads(params_bytes)
        salt = base64.b64decode(lock["salt"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise SessionError("the bundle's lock parameters are malformed") from None
    lock_key = unwrap_lock_key(lock.get("devices"), device_key)
    codes = hygiene.weights_buffer(codes_entry.size)
    failure = None
    try:
        sealed.decrypt_section_into(codes_entry.name, master.view(), codes.view())
        unlock_into(codes.view(), params, lock_key.view(), salt, weights.view())
    except LockError as exc:
        failure = str(exc)  # raised below: the traceback would pin arrays over the buffers being closed
    finally:
        codes.close()
        lock_key.close()
    if failure is not None:
        raise SessionError(f"cannot unlock the weights: {failure}")


def _flags_of(buffers: dict[str, hygiene.SecureBuffer]) -> dict[str, set[str]]:
    try:
        return {name: hygiene.mapping_flags(buffer.address) for name, buffer in buffers.items()}
    except hygiene.HygieneError:
        return {}  # no /proc/self/smaps (not Linux): nothing to report, nothing to fail


def _parse_graph(view: memoryview) -> onnx.ModelProto:
    graph = onnx.ModelProto()
    try:
        graph.ParseFromString(view)
    except (DecodeError, RuntimeError, ValueError):
        raise SessionError("decrypted graph is not a valid ONNX model (the bundle was produced incorrectly)") from None
    return graph
