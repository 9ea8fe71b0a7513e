"""Inference backends that take a model from memory: onnxruntime (default) and OpenVINO.

Both receive the weightless graph plus a view of the decrypted weights; neither is given a path,
so nothing is read from or written to disk on the way in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import helper

from modelcloak.model import external_records
from modelcloak.runtime import cacheguard, copywatch
from modelcloak.runtime.errors import SessionError

BACKENDS = ("onnxruntime", "openvino")


class Backend(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def close(self) -> None: ...


def _weight_arrays(
    graph: onnx.ModelProto, weights: memoryview, records: list[tuple[onnx.TensorProto, int, int]] | None = None
) -> tuple[list[str], list[np.ndarray]]:
    names, arrays = [], []
    for tensor, offset, length in external_records(graph) if records is None else records:
        if offset + length > len(weights):
            raise SessionError(f"weight {tensor.name!r} lies outside the weights section")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        array = np.frombuffer(weights, dtype=dtype, count=length // dtype.itemsize, offset=offset)
        names.append(tensor.name)
        arrays.append(array.reshape(tuple(tensor.dims)))
    return names, arrays


class OrtBackend:
    """onnxruntime session built from graph bytes; weights handed over as in-memory initializers.

    onnxruntime copies the initializers into its own allocator (`add_external_initializers`), so the
    caller may wipe its decrypted buffer as soon as the session exists; each tensor's bytes are
    already wiped and given back while the session builds, once onnxruntime reports it copied
    (`copywatch.RegionRelease`).
    """

    def __init__(
        self,
        graph: onnx.ModelProto,
        weights: memoryview,
        *,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None,
        threads: int | None,
        cache_policy: str,
        session_config: dict[str, Any] | None = None,
        release: Callable[[int, int], int] | None = None,
    ) -> None:
        """`release(offset, length)`, when given, wipes and hands back a region of `weights` that
        onnxruntime has copied, during the build (`copywatch`); without it `weights` is untouched."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Errors reach the caller as SessionError; onnxruntime's own coloured log line (node names,
        # sizes) would be a second, unasked-for line on stderr.
        options.log_severity_level = 4
        for name, value in (session_config or {}).items():
            # SessionOptions attributes by name, anything else as a session config entry; the cache
            # guard below then removes whatever would write the model to disk.
            if hasattr(options, name) and not name.startswith("_"):
                setattr(options, name, value)
            else:
                options.add_session_config_entry(name, str(value))
        records = external_records(graph)  # once: it parses every initializer's external_data entries
        names, arrays = _weight_arrays(graph, weights, records)
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        if names:
            options.add_external_initializers(names, values)
        regions = [(t.name, offset, length) for t, offset, length in records] if release else []
        asked_severity = options.log_severity_level
        if regions:
            # The per-tensor "copied" lines are INFO; RegionRelease consumes them (copywatch.py).
            options.log_severity_level = min(options.log_severity_level, copywatch.INFO_SEVERITY)
        cacheguard.guard_ort_session_options(options, cache_policy)
        guarded = []
        for provider in providers or ["CPUExecutionProvider"]:
            if isinstance(provider, tuple):
                name, provider_options = provider
                guarded.append((name, cacheguard.guard_provider_options(name, dict(provider_options), cache_policy)))
            else:
                guarded.append((provider, cacheguard.guard_provider_options(provider, {}, cache_policy)))
        watch = copywatch.RegionRelease(regions, release or (lambda offset, length: 0), show_from=asked_severity)
        try:
            with watch:
                self._session = ort.InferenceSession(graph.SerializeToString(), options, providers=guarded)
        except Exception as exc:  # onnxruntime's own exception types
            raise SessionError(f"onnxruntime could not build the model: {_first_line(exc)}") from None
        finally:
            del values, arrays
        self.released_bytes = watch.released_bytes  # of the caller's buffer, before the build returned
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.providers = self._session.get_providers()
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._session.run(None, feeds, self._run_options)
        except Exception as exc:
            raise SessionError(f"inference failed: {_first_line(exc)}") from None

    def close(self) -> None:
        self._session = None


class OpenVinoBackend:
    """OpenVINO compiled model read from ONNX bytes in memory, with its model cache disabled.

    OpenVINO's Python API has no zero-copy path for ONNX weights, so a transient in-memory copy of
    the full model is serialised for `read_model`; it is never written to disk.
    """

    def __init__(self, graph: onnx.ModelProto, weights: memoryview, *, device: str, cache_policy: str) -> None:
        cacheguard.block_openvino_telemetry(cache_policy)
        try:
            import openvino as ov
        except ImportError:
            raise SessionError("the OpenVINO backend needs OpenVINO: pip install 'modelcloak[openvino]'") from None
        full = onnx.ModelProto()
        full.CopyFrom(graph)
        by_name = dict(zip(*_weight_arrays(graph, weights)))
        for tensor in full.graph.initializer:
            if tensor.name in by_name:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = by_name[tensor.name].tobytes()
        core = ov.Core()
        # f32 keeps results equal to onnxruntime's; CPU plugins otherwise may pick bf16/f16.
        properties = cacheguard.guard_openvino_properties(
            {**cacheguard.openvino_properties(), "INFERENCE_PRECISION_HINT": "f32"}, cache_policy
        )
        try:
            core.set_property(properties)
            model = core.read_model(full.SerializeToString())
            self._compiled = core.compile_model(model, device, properties)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long traces
            raise SessionError(f"OpenVINO could not build the model: {_first_line(exc)}") from None
        finally:
            del full
        self.input_names = [port.get_any_name() for port in self._compiled.inputs]
        self.output_names = [port.get_any_name() for port in self._compiled.outputs]
        self._request = self._compiled.create_infer_request()
        self.providers = [f"OpenVINO:{device}"]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            result = self._request.infer({port: feeds[port.get_any_name()] for port in self._compiled.inputs})
        except Exception as exc:
            raise SessionError(f"inference failed: {_first_line(exc)}") from None
        return [np.array(result[port]) for port in self._compiled.outputs]

    def close(self) -> None:
        self._request = None
        self._compiled = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__
