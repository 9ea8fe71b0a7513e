"""`split`: public layers run here, private layers in an enclave that alone holds their key."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import onnx

from modelcloak.bundle import Bundle, SectionSource
from modelcloak.options import OptionError, coerce_policy
from modelcloak.runtime.errors import SessionError
from modelcloak.runtime.session import SplitSession, open_graph
from modelcloak.schemes.base import BundlePlan, OpenContext, ProtectRequest, SchemeClaims, refuse_unless
from modelcloak.schemes.lock import lock_entry
from modelcloak.schemes.parts import describe_lock, part_sections

CLAIMS = SchemeClaims(
    summary=(
        "public layers run here in onnxruntime; the private layers run in a separate enclave process "
        "that alone holds their key and enforces the output policy from the signed manifest"
    ),
    protects=(
        "the private layers' weights and graph: sealed under a key the host process never receives",
        "the output policy (label by default), query budget and rate limit: the host cannot change them "
        "without breaking the enclave section's authentication",
        "other users, the disk and crash dumps, with the `process` backend (non-dumpable enclave, "
        "seccomp filter: no file opens, exec or network after loading)",
        "everything `seal` protects, for the public part",
    ),
    does_not_protect=(
        "root on the device with the `process` backend: only a hardware TEE (SGX, Nitro) keeps root "
        "out of the enclave's memory",
        "the public layers: they run in plaintext on the host by design",
        "extraction by queries within the budget: measure it with `modelcloak eval extraction`",
        "a `sealed` query budget against an old state file put back (a `tpm` budget refuses that; "
        "docs/ENCLAVE.md, 'Budgets that survive restarts')",
        "the boundary activations and the shapes at the cut, which the host sees",
    ),
)


def cut_model(model: onnx.ModelProto, request: ProtectRequest) -> tuple[onnx.ModelProto, onnx.ModelProto, Any]:
    """(public part, private part, the chosen cut) for the request's cut selector."""
    from modelcloak.model.cut import find_cut, split_model, verify_split

    assert request.cut is not None  # checked by the scheme's `check`
    chosen = find_cut(model, **request.cut.as_find_cut_arguments())
    public, private = split_model(model, chosen)
    verify_split(model, public, private, chosen)  # never write a bundle that cannot run its own inputs
    return public, private, chosen


def default_budget_state(header: bytes) -> Path:
    """Where a bundle's persistent budget state lives unless the caller says: one file per bundle header."""
    import hashlib
    import os

    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "modelcloak" / "budgets" / f"{hashlib.sha256(header).hexdigest()[:32]}.state"


def _default_tpm() -> str | None:
    import os

    return "device:/dev/tpmrm0" if os.path.exists("/dev/tpmrm0") else None


class SplitScheme:
    name = "split"
    claims = CLAIMS

    def check(self, request: ProtectRequest) -> None:
        refuse_unless(
            request,
            self.name,
            allowed={"cut", "policy", "enclave_key", "lock", "native_enclave"},
            required={"cut", "enclave_key"},
        )

    def build(self, model: onnx.ModelProto, request: ProtectRequest, base_dir: Path | None) -> BundlePlan:
        from modelcloak.model.cut import batch_symbol

        policy = coerce_policy(request.policy)
        if request.native_enclave is not None and policy.persistent:
            raise OptionError(
                "the native enclave keeps its query budget per session; use budget_counter 'session' "
                "or the Python enclave for a budget that survives restarts",
                parameter="policy",
            )
        if policy.query_budget is not None and policy.budget_counter is None and request.native_enclave is None:
            # A budget is the licence's, not one process's: by default it survives restarts. (The
            # native enclave keeps it per session and would refuse the field.)
            policy = dataclasses.replace(policy, budget_counter="sealed")
        public, private, chosen = cut_model(model, request)
        private_bytes = private.SerializeToString()
        del private
        after_write: list[Callable[[Path], None]] = []
        if request.native_enclave is not None:
            from modelcloak.native import build_for_bundle, check_private_part

            check_private_part(private_bytes)  # an op it cannot run is refused before anything is written
            target = request.native_enclave

            def build_native(bundle: Path) -> None:
                build_for_bundle(bundle, private_bytes, target)  # bound to the written header

            after_write.append(build_native)
        sections, manifest, cleanup = part_sections(public, "public.", None, request.lock)
        sections.append(SectionSource("private", len(private_bytes), lambda: [private_bytes], key="enclave"))
        manifest["policy"] = policy.to_json()
        manifest["split"] = {"boundary": [spec.to_json() for spec in chosen.boundary], "batch": batch_symbol(model)}
        return BundlePlan(sections, manifest, enclave_key=request.enclave_key, cleanup=cleanup, after_write=after_write)

    def open(self, bundle: Bundle, context: OpenContext) -> SplitSession:
        import time

        from modelcloak.runtime.enclave_client import EnclaveClient

        config = context.options.enclave
        if config is None:
            raise SessionError(
                "this is a split bundle: give the enclave its key (`enclave_key_file` or `enclave_key_env`)"
            )
        lock = lock_entry(bundle.manifest.document, context)
        runner = open_graph(bundle, context.key, "public.", context.report, context.options, lock=lock)
        header, private = bundle.header, bundle.section_ciphertext("private")
        mark = time.perf_counter()
        # The timeout bounds every run(), restarts included.
        enclave = EnclaveClient(
            command=list(config.command) if config.command else None,
            timeout=config.timeout,
            budget_state=config.budget_state or default_budget_state(header),
            tpm=config.tpm or _default_tpm(),
        )
        try:
            enclave.start(config.key_arguments(), threads=config.threads)
            enclave.load(header, private, timeout=max(config.timeout, 30.0))
        except BaseException:
            enclave.close()
            runner.close()
            raise
        del private
        context.report.seconds["enclave_start"] = time.perf_counter() - mark
        return SplitSession(runner, enclave, bundle.manifest.document, context.report, licence=context.licence)

    def describe(self, document: Mapping[str, Any]) -> list[tuple[str, str]]:
        from modelcloak.enclave.policy import PolicyError, parse_policy

        rows = []
        boundary = document.get("split", {}).get("boundary", [])
        if boundary:
            rows.append(
                ("boundary", ", ".join(f"{b.get('name')} {b.get('shape')}" for b in boundary if isinstance(b, dict)))
            )
        try:
            rows.append(("output policy", parse_policy(document.get("policy")).describe()))
        except PolicyError as exc:
            rows.append(("output policy", f"INVALID: {exc}"))
        return rows + describe_lock(document)


SCHEME = SplitScheme()
