"""Device side: the session classes, and decrypting a bundle's graph into a backend in memory.

Order matters and is the security argument: caches are neutralised and the process hardened
before any runtime initialises; the signature is checked before anything decrypted is parsed or
handed to a runtime (for format 2, over the very ciphertext bytes decrypted, docs/FORMAT.md); the
key is checked against the header MAC before the sections; decrypted bytes live in buffers that are
excluded from core dumps and wiped as soon as the backend holds its own copy; the backend's copies
are then marked excluded from core dumps too, and glibc overwrites them when they are freed
(`hygiene.harden_process`, `hygiene.exclude_anonymous_memory_from_dumps`).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from modelcloak import hygiene
from modelcloak.bundle import Bundle
from modelcloak.keys import KeyProvider
from modelcloak.runtime.backends import OpenVinoBackend, OrtBackend
from modelcloak.runtime.errors import SessionError
from modelcloak.runtime.feeds import check_feeds

if TYPE_CHECKING:
    from modelcloak.options import LoadOptions


@dataclass
class LoadReport:
    """What happened while loading (`session.report`): signer, key, timings, buffer protections."""

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
    # Bytes of the decrypted weights wiped and handed back while onnxruntime was still building.
    weights_released_early: int = 0


class Session:
    """A loaded protected model, modelcloak's native API: `run` takes a dict of arrays (or one
    array for a one-input model) and returns a dict by output name.

    `scheme` says which scheme opened it; split and fhe sessions add what only they can do
    (`SplitSession.boundary`, `FheSession.evaluate`). A `LicensedUse` given at construction
    revalidates the licence before each run and meters the samples after it.
    """

    scheme = "seal"

    def __init__(
        self, backend: Any, manifest_document: dict[str, Any], report: LoadReport, *, licence: Any = None
    ) -> None:
        self._backend = backend
        self.manifest = manifest_document
        self.report = report
        # Names come from the signed manifest: OpenVINO may rename tensors when it folds nodes.
        signature = manifest_document.get("model", {})
        self.input_specs: list[dict[str, Any]] = list(signature.get("inputs", []))
        self.output_specs: list[dict[str, Any]] = list(signature.get("outputs", []))
        self.input_names: list[str] = [s["name"] for s in self.input_specs] or list(backend.input_names)
        self.output_names: list[str] = [s["name"] for s in self.output_specs] or list(backend.output_names)
        self._feed_specs = self.input_specs or [{"name": name} for name in self.input_names]
        self._licence = licence

    @property
    def providers(self) -> list[str]:
        return list(self.report.providers)

    def run(self, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        feeds = self._feeds(inputs)
        if self._licence is None:
            return self._compute(feeds)
        samples = self._samples(feeds)
        self._licence.before(samples)  # with a quota, reserves the samples: refused means nothing is answered
        results = self._compute(feeds)
        self._licence.after(samples)
        return results

    def _samples(self, feeds: dict[str, np.ndarray]) -> int:
        """Samples in this call, for the licence: rows of the batch axis wherever it sits (axis 1 of a
        sequence-first model), the largest over the inputs; the first input's leading dim when the
        signature names no batch axis."""
        symbol = (self.manifest.get("split") or {}).get("batch")
        counted: int | None = None
        for spec in self._feed_specs:
            array = feeds.get(spec["name"])
            for axis, dim in enumerate(spec.get("shape") or []):
                if isinstance(dim, str) and (dim == symbol if symbol else "batch" in dim.lower()):
                    if array is not None and getattr(array, "ndim", 0) > axis:
                        counted = max(counted or 0, int(array.shape[axis]))
                    break
        if counted is not None:
            return counted
        first = feeds[self.input_names[0]] if self.input_names else next(iter(feeds.values()))
        return int(first.shape[0]) if getattr(first, "ndim", 0) else 1

    def _feeds(self, inputs: dict[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Check names and types against the signed manifest, exactly as onnxruntime would."""
        if self._backend is None:
            raise SessionError("session is closed")
        return check_feeds(inputs, self._feed_specs)

    def _compute(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self._backend.run(feeds)))

    def close(self) -> None:
        try:
            if self._licence is not None:
                licence, self._licence = self._licence, None
                licence.close()  # the last usage batch
        finally:
            if self._backend is not None:
                self._backend.close()
                self._backend = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SplitSession(Session):
    """A split bundle: the public part runs here, the private part in the enclave process.

    The host sees the boundary tensors and whatever the enclave's output policy returns
    (labels by default), never the private part's weights or graph.
    """

    scheme = "split"

    def __init__(
        self, backend: Any, enclave: Any, manifest_document: dict[str, Any], report: LoadReport, *, licence: Any = None
    ) -> None:
        super().__init__(backend, manifest_document, report, licence=licence)
        self.enclave = enclave
        self._boundary = [spec["name"] for spec in manifest_document.get("split", {}).get("boundary", [])]
        self._public_outputs = list(backend.output_names)
        self.output_names = list(enclave.info.output_names)
        # What the enclave returns under its policy (labels by default), not the model's own outputs.
        self.output_specs = [spec.to_json() for spec in enclave.info.outputs]

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


class FheSession(Session):
    """The public part runs here; the private dense head runs encrypted (CKKS) on its output.

    Nothing here can decrypt: `evaluate` returns the result envelope (bytes) that only the owner
    backend's decryption service turns into labels (`modelcloak serve`, docs/FHE.md). `run` does
    that round trip itself when the session was opened with a label client (the `fhe_labels`
    load option); its output is then the int64 labels under the model's first output name.
    """

    scheme = "fhe"

    def __init__(
        self,
        backend: Any,
        evaluator: Any,
        manifest_document: dict[str, Any],
        report: LoadReport,
        *,
        labels: Any = None,
        top_k: int = 1,
        encrypt_features: bool = False,
    ) -> None:
        super().__init__(backend, manifest_document, report)
        self.evaluator = evaluator
        self._labels = labels
        self._top_k = top_k
        self._encrypt_features = encrypt_features
        if labels is not None:  # run() answers with the owner's labels, not the head's raw outputs
            shape = ["?"] if top_k == 1 else ["?", top_k]
            self.output_specs = [{"name": self.output_names[0], "dtype": "int64", "shape": shape}]
            self.output_names = self.output_names[:1]

    def features(self, feeds: dict[str, np.ndarray] | np.ndarray) -> np.ndarray:
        """The public part's output (the encrypted head's input), in plaintext on this device.

        Not metered here: the owner's decryption service counts each sample it decrypts.
        """
        return next(iter(super()._compute(self._feeds(feeds)).values()))

    def evaluate(self, feeds: dict[str, np.ndarray] | np.ndarray, *, encrypt_features: bool = False) -> bytes:
        """Public part, then the encrypted head; the returned envelope goes to the owner backend."""
        from modelcloak.fhe import FheError

        features = self.features(feeds)
        try:
            return self.evaluator.evaluate(features.reshape(features.shape[0], -1), encrypt_features=encrypt_features)
        except FheError as exc:
            raise SessionError(f"encrypted head: {exc}") from None

    def _compute(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._labels is None:
            raise SessionError(
                "an fhe bundle's outputs are encrypted: open it with the fhe_labels option (and a key from the "
                "owner backend) to get labels, or call evaluate() and send the result to the owner backend"
            )
        from modelcloak.fhe import FheError

        features = next(iter(super()._compute(feeds).values()))
        count = int(features.shape[0])
        try:
            result = self.evaluator.evaluate(features.reshape(count, -1), encrypt_features=self._encrypt_features)
        except FheError as exc:
            raise SessionError(f"encrypted head: {exc}") from None
        labels = np.asarray(self._labels(result, count, self._top_k), dtype=np.int64)
        return {self.output_names[0]: labels}

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._labels is not None:
                closer, self._labels = getattr(self._labels, "close", None), None
                if closer is not None:
                    closer()


def open_graph(
    sealed: Bundle,
    key: KeyProvider,
    prefix: str,
    report: LoadReport,
    options: LoadOptions,
    *,
    lock: dict[str, Any] | None = None,
    also: dict[str, bytes] | None = None,
) -> Any:
    """Decrypt `<prefix>graph` and `<prefix>weights` into wiped, non-dumpable buffers and build a backend.

    A locked part also has `<prefix>locked` (codes) and `<prefix>lock-params`: the codes are
    unlocked with the device's key into the back of the weights buffer (modelcloak.lock.layout).
    Sections named in `also` (public material, e.g. the FHE edge package) are decrypted into it
    with the same key, so the key is derived once.
    """
    clock = time.perf_counter
    if lock is not None and lock.get("part") != prefix:
        raise SessionError(f"the bundle locks part {lock.get('part')!r}, which this version cannot load")
    # The device's lock key comes from its TPM: a few round trips that are mostly waiting. Ask for it
    # now, in a thread, so it overlaps the model key, the graph and the plain weights below.
    lock_key = None if lock is None else _LockKeyRequest(lock.get("devices"), options.device_key)
    master = graph_buffer = weights_buffer = None
    try:
        master = key.key_for(sealed.manifest.key)
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
        extra: dict[str, bytearray] = {}
        for name in also or {}:  # before the signature check too, so it covers these bytes
            entry = sealed.manifest.section(name)
            extra[name] = bytearray(entry.size)
            sealed.decrypt_section_into(name, master.view(), memoryview(extra[name]))
        report.seconds["decrypt"] = clock() - mark
        try:
            # A streamed check (format 2) hashed the ciphertext as it was decrypted: until it
            # matches, nothing decrypted is parsed or handed on; on failure the guarded buffers
            # are wiped by the `finally` below, the extra sections here.
            sealed.finish_verification()
        except BaseException:
            for data in extra.values():
                data[:] = bytes(len(data))
            raise
        for name, data in extra.items():
            also[name] = bytes(data)  # type: ignore[index]
        report.buffer_flags = _flags_of({"key": master, "weights": weights_buffer, "graph": graph_buffer})
        graph = _parse_graph(graph_buffer.view())  # before the unlock: more work to overlap the TPM with
        if lock is not None and lock_key is not None:
            mark = clock()
            _unlock(sealed, master, prefix, lock, lock_key, weights_buffer)
            report.seconds["unlock"] = clock() - mark
            report.seconds["unlock_wait"] = lock_key.waited
        master.close()
        mark = clock()
        weights_view = weights_buffer.view()
        try:
            if options.backend == "onnxruntime":
                runner: Any = OrtBackend(
                    graph,
                    weights_view,
                    providers=options.providers,
                    threads=options.threads,
                    cache_policy=options.cache_policy,
                    session_config=dict(options.session_config) if options.session_config else None,
                    release=weights_buffer.release,  # each weight, once onnxruntime has its own copy
                )
            else:
                runner = OpenVinoBackend(graph, weights_view, device=options.device, cache_policy=options.cache_policy)
        finally:
            weights_view.release()
        report.seconds["build"] = clock() - mark
        report.weights_released_early = getattr(runner, "released_bytes", 0)
        # The runtime's copies (initializers, pre-packed and rewritten weights) now exist in its heap.
        report.hardening["runtime_copies_dontdump"] = hygiene.exclude_anonymous_memory_from_dumps() > 0
        report.providers = list(runner.providers)
        return runner
    finally:
        if lock_key is not None:
            lock_key.close()  # waits for the TPM and wipes a key that an earlier failure left unused
        for buffer in (master, graph_buffer, weights_buffer):
            if buffer is not None:
                buffer.close()


class _LockKeyRequest:
    """The device lock key (`unwrap_lock_key`), derived in a thread while the caller decrypts.

    The TPM's round trips wait on the chip (or swtpm) and tpm2-pytss releases the GIL in them, so
    the load's own work goes on meanwhile. `take()` waits and hands the key over (the caller
    closes it) or raises what the derivation raised; `close()` waits and wipes an untaken key.
    """

    def __init__(self, entries: Any, device_key: Any) -> None:
        self._key: hygiene.SecureBuffer | None = None
        self._error: BaseException | None = None
        self.waited = 0.0  # seconds the load spent waiting for the key
        self._thread = threading.Thread(
            target=self._derive, args=(entries, device_key), name="modelcloak-device-key", daemon=True
        )
        self._thread.start()

    def _derive(self, entries: Any, device_key: Any) -> None:
        from modelcloak.keys.device import unwrap_lock_key

        try:
            self._key = unwrap_lock_key(entries, device_key)
        except BaseException as exc:  # handed to the loading thread by take()
            self._error = exc

    def take(self) -> hygiene.SecureBuffer:
        mark = time.perf_counter()
        self._thread.join()
        self.waited = time.perf_counter() - mark
        error, self._error = self._error, None
        if error is not None:
            raise error.with_traceback(None)
        key, self._key = self._key, None
        if key is None:
            raise SessionError("the device lock key was already used")
        return key

    def close(self) -> None:
        self._thread.join()
        self._error = None
        if self._key is not None:
            self._key.close()
            self._key = None


def _locked_weights_size(lock: dict[str, Any], plain_size: int) -> int:
    size = lock.get("weights_size")
    if not isinstance(size, int) or size < plain_size:
        raise SessionError("the bundle's lock entry has no valid weights_size")
    return size


def _unlock(
    sealed: Bundle,
    master: hygiene.SecureBuffer,
    prefix: str,
    lock: dict[str, Any],
    request: _LockKeyRequest,
    weights: Any,
) -> None:
    """Decrypt the locked codes and unlock them with this device's key into the weights buffer."""
    from modelcloak.lock import LockError
    from modelcloak.lock.layout import SEALED, unlock_into

    codes_entry = sealed.manifest.section(prefix + "locked")
    params_entry = sealed.manifest.section(prefix + "lock-params")
    params_bytes = bytearray(params_entry.size)
    sealed.decrypt_section_into(params_entry.name, master.view(), memoryview(params_bytes))
    try:
        params = json.loads(params_bytes)
        salt = base64.b64decode(lock["salt"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise SessionError("the bundle's lock parameters are malformed") from None
    lock_key = request.take()
    if params.get("method") == SEALED:
        _unlock_sealed(sealed, master, codes_entry, lock_key, weights)
        return
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


def _unlock_sealed(sealed: Bundle, master: hygiene.SecureBuffer, entry: Any, lock_key: Any, weights: Any) -> None:
    """`sealed`: decrypt the locked region straight into the back of the weights buffer."""
    from modelcloak.bundle import BundleError
    from modelcloak.lock.layout import lock_section_key

    plain_size = weights.size - entry.size
    if plain_size < 0:
        lock_key.close()
        raise SessionError("the bundle's locked section is larger than its weights buffer")
    region = weights.view()[plain_size:]
    try:
        sealed.decrypt_section_into(entry.name, lock_section_key(master.view(), lock_key.view()), region)
    except BundleError:
        # Right fingerprint (unwrap_lock_key checked it), wrong key: the entry's wrapped key was
        # altered, e.g. relabelled for another device. No weights were produced.
        raise SessionError(
            "the locked weights do not open with this device's key: the bundle's lock entry for this device "
            "was altered (or relabelled from another device), or the locked section is damaged"
        ) from None
    finally:
        region.release()
        lock_key.close()


def _flags_of(buffers: dict[str, hygiene.SecureBuffer]) -> dict[str, set[str]]:
    try:
        flags = hygiene.mapping_flags_of([buffer.address for buffer in buffers.values()])
        return {name: flags[buffer.address] for name, buffer in buffers.items()}
    except hygiene.HygieneError:
        return {}  # no /proc/self/smaps (not Linux): nothing to report, nothing to fail


def _parse_graph(view: memoryview) -> onnx.ModelProto:
    graph = onnx.ModelProto()
    try:
        graph.ParseFromString(view)
    except (DecodeError, RuntimeError, ValueError):
        raise SessionError("decrypted graph is not a valid ONNX model (the bundle was produced incorrectly)") from None
    return graph
