"""Check what a caller feeds a sealed model against the signed signature, the way onnxruntime does.

onnxruntime refuses an array whose element type differs from the input's; it never casts. A sealed
session must behave the same: a silent cast would hide a caller's mistake (float64 rounded to
float32) or corrupt values (a uint64 above 2**63 fed to an int64 input wraps negative). Plain
Python numbers and lists are the one convenience onnxruntime also offers: they are converted to
the input's type when every value survives the conversion exactly.

Types come from the manifest as strings (``modelcloak.model.importer.type_text``): a numpy dtype
name for tensors, ``sequence(T)``, ``optional(T)`` or ``map(K,V)`` otherwise. Shapes are left to
the runtime, which knows the symbolic dimensions. 0-d (scalar) arrays stay 0-d.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modelcloak.runtime.errors import SessionError

__all__ = ["cast_feeds", "check_feeds"]

_STRING_KINDS = frozenset("USO")


def check_feeds(inputs: Mapping[str, Any] | Any, input_specs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Feeds by input name, each checked against its spec; raises SessionError naming what is wrong.

    ``inputs`` is a dict by input name, or a single value for a model with exactly one input.
    ``input_specs`` are the manifest's ``model.inputs`` entries (``name`` and ``dtype``; an entry
    without ``dtype`` is passed through unchecked).
    """
    names = [str(spec["name"]) for spec in input_specs]
    if not isinstance(inputs, Mapping):
        if len(names) != 1:
            listed = f" ({', '.join(names)})" if names else ""
            raise SessionError(f"model has {len(names)} inputs{listed}; pass a dict by input name")
        inputs = {names[0]: inputs}
    missing = [name for name in names if name not in inputs]
    unknown = [str(name) for name in inputs if name not in names]
    if missing or unknown:
        parts = [f"missing {', '.join(missing)}" if missing else "", f"unknown {', '.join(unknown)}" if unknown else ""]
        raise SessionError("input names do not match the model: " + "; ".join(p for p in parts if p))
    feeds = {}
    for spec in input_specs:
        name = str(spec["name"])
        kind = spec.get("dtype")
        feeds[name] = inputs[name] if kind is None else _check(inputs[name], str(kind), f"input {name!r}")
        _check_shape(name, feeds[name], spec.get("shape"))
    return feeds


def _check_shape(name: str, value: Any, declared: Sequence[Any] | None) -> None:
    """Refuse a tensor whose rank or fixed dims differ from the signed signature, in one line."""
    if declared is None or not isinstance(value, np.ndarray):
        return
    fits = value.ndim == len(declared)
    for dim, got in zip(declared, value.shape) if fits else ():  # a loop, not any(): this runs on every call
        if isinstance(dim, int) and dim != got:
            fits = False
            break
    if not fits:
        expected = "[" + ", ".join("?" if d is None else str(d) for d in declared) + "]"
        raise SessionError(f"input {name!r} must have shape {expected}, got {list(value.shape)}")


def _check(value: Any, kind: str, what: str) -> Any:
    if kind.startswith("optional(") and kind.endswith(")"):
        return None if value is None else _check(value, kind[len("optional(") : -1], what)
    if value is None:
        raise SessionError(f"{what} is required (it is not optional), got None")
    if kind.startswith("sequence(") and kind.endswith(")"):
        if isinstance(value, np.ndarray) or not isinstance(value, list | tuple):
            raise SessionError(f"{what} is a sequence: pass a list of arrays, got {type(value).__name__}")
        inner = kind[len("sequence(") : -1]
        return [_check(item, inner, f"{what} item {index}") for index, item in enumerate(value)]
    if kind.startswith("map("):
        raise SessionError(f"{what} is a map; sealed sessions do not take map inputs")
    expected = _numpy_dtype(kind)
    if expected is None:
        return value  # a type numpy does not name (bfloat16, float8 without ml_dtypes): onnxruntime checks it
    return _tensor(value, expected, what)


@functools.lru_cache(maxsize=256)
def _numpy_dtype(kind: str) -> np.dtype | None:
    try:
        return np.dtype(kind)
    except TypeError:
        return None


def _tensor(value: Any, expected: np.dtype, what: str) -> np.ndarray:
    if type(value) is np.ndarray and value.dtype == expected and value.flags.c_contiguous:
        return value  # the usual case, already what onnxruntime takes: no conversion to check
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        if not _same_type(array.dtype, expected):
            raise SessionError(
                f"{what} must be {_type_name(expected)}, got {_type_name(array.dtype)} "
                f"(onnxruntime does not convert types; convert it with .astype(np.{_type_name(expected)}))"
            )
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
        return np.require(array, requirements="C")
    return _from_python(value, expected, what)


def _from_python(value: Any, expected: np.dtype, what: str) -> np.ndarray:
    """Plain numbers and (nested) lists: converted only when every value survives exactly."""
    try:
        natural = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise SessionError(f"{what} is not a regular array: {exc}") from None
    if _same_type(natural.dtype, expected):
        return np.require(natural, requirements="C")
    if natural.dtype.kind not in "biuf" or expected.kind not in "biuf":
        raise SessionError(f"{what} must be {_type_name(expected)}, got {_type_name(natural.dtype)}")
    try:
        with np.errstate(all="ignore"):
            converted = np.asarray(value, dtype=expected)
            exact = np.array_equal(converted.astype(natural.dtype), natural, equal_nan=natural.dtype.kind == "f")
    except (OverflowError, ValueError):
        exact = False
    if not exact:
        raise SessionError(f"{what} must be {_type_name(expected)}: some values do not fit it exactly")
    return np.require(converted, requirements="C")


def _same_type(actual: np.dtype, expected: np.dtype) -> bool:
    if expected.kind == "O" or expected.kind in "US":  # string tensors: onnxruntime takes str, bytes or object
        return actual.kind in _STRING_KINDS
    # Byte order matters to us, not to onnxruntime's type check: compare the type, then fix the order.
    return actual.newbyteorder("=") == expected.newbyteorder("=") if actual.kind == expected.kind else False


def _type_name(dtype: np.dtype) -> str:
    return "string" if dtype.kind in _STRING_KINDS else dtype.name


def cast_feeds(inputs: Mapping[str, Any] | Any, input_specs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | Any:
    """What ``--cast`` asks for: arrays converted to their tensor input's type, never wrapped.

    Conversions numpy calls ``same_kind`` are made (float64 to float32 rounds, as asked); integers
    must fit the target's range and finite floats must stay finite, otherwise SessionError. Inputs
    that are not plain tensors, and names the model does not have, are passed on for
    :func:`check_feeds` to judge.
    """
    kinds = {str(spec["name"]): spec.get("dtype") for spec in input_specs}
    single = not isinstance(inputs, Mapping)
    if single and len(kinds) != 1:
        return inputs
    named = {next(iter(kinds)): inputs} if single else dict(inputs)
    for name, value in named.items():
        kind = kinds.get(name)
        if not isinstance(value, np.ndarray) or not isinstance(kind, str) or "(" in kind:
            continue
        try:
            expected = np.dtype(kind)
        except TypeError:
            continue
        named[name] = _cast(value, expected, f"input {name!r}")
    return named[next(iter(kinds))] if single else named


def _cast(array: np.ndarray, expected: np.dtype, what: str) -> np.ndarray:
    if _same_type(array.dtype, expected):
        return array
    if not np.can_cast(array.dtype, expected, casting="same_kind"):
        raise SessionError(
            f"{what}: cannot cast {_type_name(array.dtype)} to {_type_name(expected)} without losing kind"
        )
    if expected.kind in "iu" and array.size:
        info = np.iinfo(expected)
        if array.min() < info.min or array.max() > info.max:
            raise SessionError(f"{what}: values outside {_type_name(expected)}'s range ({info.min}..{info.max})")
    with np.errstate(over="ignore"):
        converted = array.astype(expected)
    if expected.kind == "f" and array.dtype.kind == "f" and bool(np.any(np.isfinite(array) & ~np.isfinite(converted))):
        raise SessionError(f"{what}: some values are too large for {_type_name(expected)}")
    return converted
