"""Typed options for `protect()` and for opening a bundle, validated once, here.

Each class is small and frozen, in the spirit of onnxruntime's `SessionOptions`: the library
checks its own values and names its own parameters in errors (`OptionError.parameter`); only the
CLI maps parameter names to command-line flags. Plain mappings (`{"last": 2}`) are still accepted
where a caller hands options through from JSON or a config file; they are converted exactly once,
by the `*.coerce()` class methods, and then validated like any other value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelcloak.enclave.policy import OutputPolicy, PolicyError, parse_policy
from modelcloak.errors import ModelcloakError
from modelcloak.runtime.errors import SessionError

if TYPE_CHECKING:
    from modelcloak.keys.device import DeviceKeyBase, DeviceLockKey

__all__ = [
    "BACKENDS",
    "CACHE_POLICIES",
    "FHE_ACTIVATIONS",
    "LOCK_METHODS",
    "CutSelector",
    "EnclaveConfig",
    "FheLabels",
    "FheOptions",
    "LoadOptions",
    "LockOptions",
    "Metering",
    "LoadOptionError",
    "OptionError",
    "OutputPolicy",
    "coerce_policy",
]

BACKENDS = ("onnxruntime", "openvino")
CACHE_POLICIES = ("override", "strict", "off")
FHE_ACTIVATIONS = ("square", "modified-square", "relu-poly", "none")
FHE_SECURITY_LEVELS = (128, 192, 256)
# The lock room owns the methods; repeated here so that checking an option imports no numpy code.
LOCK_METHODS = ("sealed", "uniform-shift", "plain-aes", "permutation")


class OptionError(ModelcloakError):
    """An option has a wrong value or does not apply; `parameter` names it (dotted for nested ones)."""

    def __init__(self, message: str, *, parameter: str) -> None:
        super().__init__(message)
        self.parameter = parameter


class LoadOptionError(OptionError, SessionError):
    """A load option is wrong: caught as either, since opening a bundle raises SessionError."""


def _from_mapping(cls: type, value: Mapping[str, Any], parameter: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise OptionError(
            f"unknown {parameter} option {unknown[0]!r}; known: {', '.join(sorted(known))}", parameter=parameter
        )
    return cls(**value)


@dataclass(frozen=True)
class CutSelector:
    """Where to cut a model: exactly one of the four selectors (see `modelcloak.model.cut.find_cut`).

    `after_node` names the last public node; `tensors` is the exact boundary; `last` keeps the last N
    weight-carrying layers private; `index` is a position in `modelcloak splits`' table.
    """

    after_node: str | None = None
    tensors: tuple[str, ...] | None = None
    last: int | None = None
    index: int | None = None

    def __post_init__(self) -> None:
        if self.tensors is not None:
            object.__setattr__(self, "tensors", tuple(self.tensors))
            if not self.tensors or not all(isinstance(t, str) and t for t in self.tensors):
                raise OptionError("cut tensors must be a non-empty list of tensor names", parameter="cut")
        given = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        if len(given) != 1:
            raise OptionError(
                f"cut needs exactly one of after_node, tensors, last or index (got: {', '.join(given) or 'none'})",
                parameter="cut",
            )
        for name in ("last", "index"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise OptionError(f"cut {name} must be an integer", parameter="cut")
        if self.last is not None and self.last < 1:
            raise OptionError("cut last must be at least 1", parameter="cut")

    def as_find_cut_arguments(self) -> dict[str, Any]:
        """The keyword arguments of `modelcloak.model.cut.find_cut` for this selector."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def coerce(cls, value: CutSelector | Mapping[str, Any]) -> CutSelector:
        if isinstance(value, CutSelector):
            return value
        if isinstance(value, Mapping):
            return _from_mapping(cls, value, "cut")
        raise OptionError(f"cut must be a CutSelector, got {type(value).__name__}", parameter="cut")


def coerce_policy(value: OutputPolicy | Mapping[str, Any] | None) -> OutputPolicy:
    """The enclave's own `OutputPolicy` from itself, its manifest JSON, or None (label, unlimited)."""
    if isinstance(value, OutputPolicy):
        value = value.to_json()  # re-validated: a hand-built OutputPolicy skips parse_policy's checks
    try:
        return parse_policy(value)
    except PolicyError as exc:
        raise OptionError(f"invalid output policy: {exc}", parameter="policy") from None


@dataclass(frozen=True)
class LockOptions:
    """Lock the weights to enrolled devices (their exported `DeviceLockKey`s)."""

    devices: tuple[DeviceLockKey, ...]
    method: str = "sealed"

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.devices:
            raise OptionError("lock needs at least one device lock key", parameter="lock.devices")
        if self.method not in LOCK_METHODS:
            raise OptionError(
                f"unknown lock method {self.method!r}; choose one of {', '.join(LOCK_METHODS)}",
                parameter="lock.method",
            )

    @classmethod
    def coerce(cls, value: LockOptions | Sequence[DeviceLockKey]) -> LockOptions:
        """A `LockOptions`, or just the device keys (default method)."""
        return value if isinstance(value, LockOptions) else cls(tuple(value))


@dataclass(frozen=True)
class FheOptions:
    """The private head under CKKS: where the owner's secret goes and how the head is compiled.

    `calibration` (model inputs) is needed by `relu-poly`, which fits ReLU over the range the
    head's inputs take on them; it also measures the encrypted head's agreement with the plain
    one. `scale_bits`/`poly_degree` fix the CKKS parameters instead of measuring them; `head` is
    a head fine-tuned by `modelcloak fhe-finetune` (HEAD.npz) that replaces the cut's own.
    `train_inputs`/`train_labels` (model inputs and class indices) have `protect` fine-tune the
    head with `activation` itself (`finetune_epochs` epochs) and record held-out accuracies;
    `activation` then defaults to `relu-poly` instead of `square`.
    """

    secret_out: Path
    # None: `square`, or `relu-poly` when `protect` fine-tunes (train_inputs): it lowers to the same
    # "dense, then square" program, so it costs the same under CKKS, and it kept accuracy in
    # bench-fhe where a fine-tuned square did not (docs/BENCHMARKS.md).
    activation: str | None = None
    security: int = 128
    encrypt_weights: bool = True
    calibration: Any = None
    scale_bits: int | None = None
    poly_degree: int | None = None
    head: Path | None = None
    train_inputs: Any = None
    train_labels: Any = None
    finetune_epochs: int = 6

    def __post_init__(self) -> None:
        if not self.secret_out:
            raise OptionError("fhe needs secret_out, a file for the owner's secret", parameter="fhe.secret_out")
        if (self.train_inputs is None) != (self.train_labels is None):
            raise OptionError("fine-tuning needs both training inputs and their labels", parameter="fhe.train_labels")
        if self.train_inputs is not None and self.head is not None:
            raise OptionError(
                "give either a fine-tuned head or training data to fine-tune, not both", parameter="fhe.head"
            )
        if not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 1:
            raise OptionError("fine-tuning epochs must be a positive integer", parameter="fhe.finetune_epochs")
        object.__setattr__(self, "secret_out", Path(self.secret_out))
        if self.activation is None:
            object.__setattr__(self, "activation", "relu-poly" if self.train_inputs is not None else "square")
        if self.activation not in FHE_ACTIVATIONS:
            raise OptionError(
                f"unknown FHE activation {self.activation!r}; choose one of {', '.join(FHE_ACTIVATIONS)}",
                parameter="fhe.activation",
            )
        if self.security not in FHE_SECURITY_LEVELS:
            raise OptionError(
                f"FHE security must be one of {', '.join(map(str, FHE_SECURITY_LEVELS))} bits",
                parameter="fhe.security",
            )
        if self.head is not None:
            object.__setattr__(self, "head", Path(self.head))
        fitted_elsewhere = self.head is not None or self.train_inputs is not None
        if self.activation == "relu-poly" and self.calibration is None and not fitted_elsewhere:
            raise OptionError(
                "activation relu-poly needs calibration inputs to fit ReLU over their range",
                parameter="fhe.calibration",
            )

    @classmethod
    def coerce(cls, value: FheOptions | Mapping[str, Any]) -> FheOptions:
        if isinstance(value, FheOptions):
            return value
        if isinstance(value, Mapping):
            if not value.get("secret_out"):
                raise OptionError("fhe needs secret_out, a file for the owner's secret", parameter="fhe.secret_out")
            settings = {k: v for k, v in value.items() if v is not None}
            return _from_mapping(cls, settings, "fhe")
        raise OptionError(f"fhe must be FheOptions, got {type(value).__name__}", parameter="fhe")


@dataclass(frozen=True)
class EnclaveConfig:
    """How the host starts a split bundle's enclave; the enclave reads its key itself.

    Exactly one of `key_file` and `key_env`: the host process passes the enclave a path or a
    variable name, never the key. `timeout` bounds each request in seconds. `command` starts
    another enclave program instead of `python -m modelcloak.enclave`, such as the bundle's
    native enclave (`modelcloak.native.NativeBuild.command()`).
    """

    key_file: Path | None = None
    key_env: str | None = None
    threads: int | None = None
    timeout: float = 10.0
    command: tuple[str, ...] | None = None
    # A persistent query budget's sealed state (policy budget_counter "sealed"/"tpm"); None: a file
    # per bundle under $XDG_STATE_HOME/modelcloak/budgets (docs/ENCLAVE.md).
    budget_state: Path | None = None
    tpm: str | None = None  # TCTI of the TPM holding a "tpm" budget's counter; None: device:/dev/tpmrm0

    def __post_init__(self) -> None:
        if self.key_file is not None and self.key_env is not None:
            raise LoadOptionError(
                "give the enclave key one way: `enclave_key_file` or `enclave_key_env`, not both",
                parameter="enclave.key_file",
            )
        if self.key_file is None and self.key_env is None:
            raise LoadOptionError(
                "the enclave needs exactly one key source: key_file or key_env", parameter="enclave.key_file"
            )
        if self.key_file is not None:
            object.__setattr__(self, "key_file", Path(self.key_file))
        if self.command is not None:
            object.__setattr__(self, "command", tuple(str(part) for part in self.command))
        if self.budget_state is not None:
            object.__setattr__(self, "budget_state", Path(self.budget_state))
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise LoadOptionError("enclave threads must be a positive integer", parameter="enclave.threads")
        if not isinstance(self.timeout, (int, float)) or not math.isfinite(self.timeout) or self.timeout <= 0:
            raise LoadOptionError("enclave timeout must be a positive number of seconds", parameter="enclave.timeout")

    def key_arguments(self) -> list[str]:
        """The enclave program's command-line arguments that name its key source."""
        return ["--key-file", str(self.key_file)] if self.key_file is not None else ["--key-env", str(self.key_env)]


@dataclass(frozen=True)
class Metering:
    """Licence revalidation and usage reporting while a session runs (key from the owner backend).

    `state_path` keeps unsent usage counts across restarts; a batch goes to the backend every
    `report_every` samples and when the session closes.
    """

    state_path: Path
    report_every: int = 1000
    clock: Any = None  # a zero-argument callable giving an aware datetime; None: the system clock

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_path", Path(self.state_path))
        if not isinstance(self.report_every, int) or self.report_every < 1:
            raise LoadOptionError("metering report_every must be at least 1", parameter="metering.report_every")


@dataclass(frozen=True)
class FheLabels:
    """Have an fhe bundle's `run()` return labels: each encrypted result goes to the owner backend.

    Needs the licence's usage key, so the bundle's key must come from the owner backend
    (`OwnerBackendKey`); `state_path` keeps the request sequence across restarts.
    """

    state_path: Path
    top_k: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_path", Path(self.state_path))
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise LoadOptionError("fhe_labels top_k must be at least 1", parameter="fhe_labels.top_k")


@dataclass(frozen=True)
class LoadOptions:
    """How to open a bundle on the device; every field has a safe default.

    `trusted_signers` (public keys or PEM files) makes the owner signature mandatory and pins who
    may have signed. `cache_policy` is "override" (neutralise on-disk caches, warn), "strict"
    (refuse to start when one is enabled) or "off" (unsafe; for tests that prove leaks are
    detectable). `session_config` sets onnxruntime SessionOptions attributes or config entries.
    `enclave` is needed by split bundles, `device_key` by locked ones
    (`modelcloak.keys.enrolled.open_device_key(state_dir)`).
    """

    backend: str = "onnxruntime"
    providers: tuple[Any, ...] | None = None
    device: str = "CPU"
    threads: int | None = None
    trusted_signers: tuple[bytes | str | Path, ...] = ()
    require_signature: bool = False
    # Refuse bundles whose owner release number is below this (rollback); needs trusted_signers.
    min_serial: int | None = None
    cache_policy: str = "override"
    session_config: Mapping[str, Any] | None = None
    enclave: EnclaveConfig | None = None
    device_key: DeviceKeyBase | None = None
    metering: Metering | None = None
    fhe_labels: FheLabels | None = None
    # fhe bundles: also encrypt the head's inputs on the device (slower; hides them from the owner too).
    encrypt_features: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise LoadOptionError(
                f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}", parameter="backend"
            )
        if self.cache_policy not in CACHE_POLICIES:
            raise LoadOptionError(
                f"cache_policy must be one of {', '.join(CACHE_POLICIES)}, got {self.cache_policy!r}",
                parameter="cache_policy",
            )
        if self.threads is not None and (
            not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1
        ):
            raise LoadOptionError("threads must be a positive integer", parameter="threads")
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(self, "trusted_signers", tuple(self.trusted_signers or ()))

    @classmethod
    def from_keywords(cls, base: LoadOptions | None = None, **settings: Any) -> LoadOptions:
        """`base` with `settings` replaced; `enclave_key_file`, `enclave_key_env`, `enclave_threads`
        and `enclave_timeout` build the `enclave` field (the flat spelling of `load()`)."""
        current = {f.name: getattr(base, f.name) for f in fields(cls)} if base is not None else {}
        enclave = {k.removeprefix("enclave_"): settings.pop(k) for k in list(settings) if k.startswith("enclave_")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise LoadOptionError(f"unknown load option {unknown[0]!r}", parameter=unknown[0])
        current.update(settings)
        enclave = {k: v for k, v in enclave.items() if v is not None}
        if enclave:
            unknown_enclave = sorted(set(enclave) - {f.name for f in fields(EnclaveConfig)})
            if unknown_enclave:
                raise LoadOptionError(f"unknown load option 'enclave_{unknown_enclave[0]}'", parameter="enclave")
            if {"key_file", "key_env"} & set(enclave):
                current["enclave"] = EnclaveConfig(**enclave)
            elif current.get("enclave") is not None:
                settings_now = {f.name: getattr(current["enclave"], f.name) for f in fields(EnclaveConfig)}
                current["enclave"] = EnclaveConfig(**{**settings_now, **enclave})
        return cls(**current)
