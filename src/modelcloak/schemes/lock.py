"""`lock`: sealed like `seal`, and the weights also locked to enrolled devices (docs/LOCK.md)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from modelcloak.bundle import Bundle
from modelcloak.runtime.errors import SessionError
from modelcloak.runtime.session import Session, open_graph
from modelcloak.schemes.base import BundlePlan, OpenContext, ProtectRequest, SchemeClaims, refuse_unless
from modelcloak.schemes.parts import describe_lock, part_sections

CLAIMS = SchemeClaims(
    summary=(
        "sealed like `seal`, and the weights are also locked to enrolled devices (a TPM-sealed secret, or "
        "a weaker software secret): only those devices open the locked weights (the `sealed` method: "
        "they are sealed under a key that needs the device's lock key)"
    ),
    protects=(
        "a copied bundle with its key file: on another machine (another TPM) the device secret does not unseal",
        "a copied device state directory: the TPM-sealed secret opens only on the TPM that sealed it, and "
        "with --pcrs only in the enrolled boot state",
        "an attacker who rewrites the device entry for their own device: with `sealed` (the default) the "
        "locked weights fail their authentication and the load is refused; with uniform-shift they unlock "
        "to values with each tensor's own distribution and accuracy falls to chance",
        "everything `seal` protects",
    ),
    does_not_protect=(
        "root on an authorised, running device: the unlocked weights are in process memory",
        "software-enrolled devices against someone who copies the state and fakes the machine identifiers",
        "the model structure, single-number tensors and control inputs (Resize scales, Clip bounds), which are "
        "sealed, not locked",
        "whoever received the exported device lock key (the owner's copy): keep it like a model key",
        "with `sealed`, a wrong device key is refused rather than giving a model that runs at chance, so a "
        "thief learns that a key is wrong (the key is 256 random bits; uniform-shift keeps the decoy)",
    ),
)


def lock_entry(document: Mapping[str, Any], context: OpenContext) -> dict[str, Any] | None:
    """The bundle's lock entry, checked against the device key the session was given."""
    lock = document.get("lock")
    if lock is not None and context.options.device_key is None:
        raise SessionError("this bundle is locked to a device: give this device's key (`device_key`)")
    return lock


class LockScheme:
    name = "lock"
    claims = CLAIMS

    def check(self, request: ProtectRequest) -> None:
        if request.lock is None:
            from modelcloak.options import OptionError

            raise OptionError("scheme 'lock' needs at least one device lock key (`lock`)", parameter="lock")
        refuse_unless(request, self.name, allowed={"lock"})

    def build(self, model: onnx.ModelProto, request: ProtectRequest, base_dir: Path | None) -> BundlePlan:
        sections, manifest, cleanup = part_sections(model, "", base_dir, request.lock)
        return BundlePlan(sections, manifest, cleanup=cleanup)

    def open(self, bundle: Bundle, context: OpenContext) -> Session:
        lock = lock_entry(bundle.manifest.document, context)
        runner = open_graph(bundle, context.key, "", context.report, context.options, lock=lock)
        return Session(runner, bundle.manifest.document, context.report, licence=context.licence)

    def describe(self, document: Mapping[str, Any]) -> list[tuple[str, str]]:
        return describe_lock(document)


SCHEME = LockScheme()
