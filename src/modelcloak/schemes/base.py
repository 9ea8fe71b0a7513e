"""What a scheme is: the one small protocol every protection scheme implements.

A scheme is one module under `modelcloak.schemes` holding one object that

- names itself and states what it protects and what it does not (`claims`, shown by `inspect`);
- checks which protect options apply to it (`check`);
- says, on the owner side, which sections and manifest entries it writes (`build`);
- opens, on the device side, a verified bundle of its kind into a session (`open`);
- describes its manifest entries for `modelcloak inspect` (`describe`).

`modelcloak.protect()` and `modelcloak.load()` only dispatch to it (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from modelcloak.options import CutSelector, FheOptions, LoadOptions, LockOptions, OptionError, OutputPolicy

if TYPE_CHECKING:
    import onnx

    from modelcloak.bundle import Bundle, SectionSource
    from modelcloak.keys import KeyProvider
    from modelcloak.runtime.session import LoadReport, Session


@dataclass(frozen=True)
class SchemeClaims:
    """What a scheme protects and what it does not; each claim has a test named in docs/SECURITY.md."""

    summary: str
    protects: tuple[str, ...]
    does_not_protect: tuple[str, ...]


@dataclass(frozen=True)
class ProtectRequest:
    """The scheme-specific options of one `protect()` call, typed and validated."""

    cut: CutSelector | None = None
    policy: OutputPolicy | None = None
    enclave_key: KeyProvider | None = None
    lock: LockOptions | None = None
    fhe: FheOptions | None = None
    native_enclave: Path | None = None  # split: where to build the private part's native enclave

    def given(self) -> list[str]:
        names = ("cut", "policy", "enclave_key", "lock", "fhe", "native_enclave")
        return [name for name in names if getattr(self, name) is not None]


@dataclass
class BundlePlan:
    """What a scheme puts into the bundle: its sections and its manifest entries.

    `enclave_key` is the provider of the key that seals sections whose key scope is "enclave".
    `cleanup` runs once the bundle is written or has failed; `on_failure` only when it failed
    (it removes what must not outlive a missing bundle, such as the owner's FHE secret);
    `after_write` gets the written bundle's path (a native enclave is bound to its header).
    """

    sections: list[SectionSource]
    manifest: dict[str, Any]
    enclave_key: KeyProvider | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    on_failure: list[Callable[[], None]] = field(default_factory=list)
    after_write: list[Callable[[Path], None]] = field(default_factory=list)


@dataclass
class OpenContext:
    """What the device side hands a scheme's `open`: the key, the load options, the running report."""

    key: KeyProvider
    options: LoadOptions
    report: LoadReport
    licence: Any = None  # a runtime.metering.LicensedUse when the `metering` option is set


class Scheme(Protocol):
    name: str
    claims: SchemeClaims

    def check(self, request: ProtectRequest) -> None:
        """Refuse options that do not apply to this scheme or that it is missing (OptionError)."""
        ...

    def build(self, model: onnx.ModelProto, request: ProtectRequest, base_dir: Path | None) -> BundlePlan:
        """Owner side: the sections and manifest entries for `model`."""
        ...

    def open(self, bundle: Bundle, context: OpenContext) -> Session:
        """Device side: a session for this verified bundle (signature already checked)."""
        ...

    def describe(self, document: Mapping[str, Any]) -> list[tuple[str, str]]:
        """`inspect` rows (label, text) for this scheme's manifest entries."""
        ...


def refuse_unless(
    request: ProtectRequest, scheme: str, allowed: Collection[str], required: Collection[str] = ()
) -> None:
    """The common part of `check`: options outside `allowed` do not apply, `required` must be given."""
    given = set(request.given())
    for name in sorted(given - set(allowed)):
        where = {
            "cut": "schemes 'split' and 'fhe'",
            "enclave_key": "scheme 'split'",
            "policy": "scheme 'split'",
            "fhe": "scheme 'fhe'",
            "lock": "schemes 'lock' and 'split'",
            "native_enclave": "scheme 'split'",
        }[name]
        raise OptionError(f"`{name}` only applies to {where}, not {scheme!r}", parameter=name)
    for name in sorted(set(required) - given):
        if name == "cut":
            raise OptionError(
                f"scheme {scheme!r} needs a cut: exactly one of `cut.after_node`, `cut.tensors`, `cut.last` "
                "or `cut.index`",
                parameter=name,
            )
        raise OptionError(f"scheme {scheme!r} needs `{name}`", parameter=name)
