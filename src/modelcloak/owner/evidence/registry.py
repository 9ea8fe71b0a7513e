"""Which verifier checks which kind of evidence.

The real formats live in their own modules and are imported only when evidence of that kind
arrives, so the backend starts (and `sim` works) whether or not a format's module or its
dependencies are present; a kind whose module is missing is refused with that reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from modelcloak.owner.evidence.base import EvidenceError, Verifier

# kind -> (module, class). Only `sim` is insecure; see sim.py.
KNOWN_KINDS: dict[str, tuple[str, str]] = {
    "sim": ("modelcloak.owner.evidence.sim", "SimVerifier"),
    "tpm": ("modelcloak.owner.evidence.tpm_quote", "TpmQuoteVerifier"),
    "nitro": ("modelcloak.owner.evidence.nitro", "NitroVerifier"),
    "sev-snp": ("modelcloak.owner.evidence.sev_snp", "SevSnpVerifier"),
    "sgx-dcap": ("modelcloak.owner.evidence.sgx_dcap", "SgxDcapVerifier"),
}
INSECURE_KINDS = frozenset({"sim"})


class VerifierRegistry:
    """Verifiers by kind: explicitly given ones first (tests inject a clock or a test root), else the defaults."""

    def __init__(self, verifiers: Mapping[str, Verifier] | None = None) -> None:
        self._verifiers: dict[str, Verifier] = dict(verifiers or {})

    def get(self, kind: str) -> Verifier:
        if kind in self._verifiers:
            return self._verifiers[kind]
        if kind not in KNOWN_KINDS:
            raise EvidenceError(f"unknown evidence kind {kind!r}; known: {', '.join(sorted(KNOWN_KINDS))}")
        module_name, class_name = KNOWN_KINDS[kind]
        try:
            module = importlib.import_module(module_name)
            verifier = getattr(module, class_name)()
        except ImportError as exc:
            raise EvidenceError(f"evidence kind {kind!r} is not available in this installation ({exc})") from None
        except (AttributeError, TypeError) as exc:
            raise EvidenceError(f"evidence kind {kind!r} cannot be set up by default ({exc})") from None
        self._verifiers[kind] = verifier
        return verifier


def known_kind(kind: str) -> bool:
    return kind in KNOWN_KINDS
