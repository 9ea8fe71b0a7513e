"""Evidence verifiers behind one interface (see base.py)."""

from modelcloak.licensing.protocol import BINDING_LABEL, binding_digest
from modelcloak.owner.evidence.base import Claims, EvidenceError, Verifier

__all__ = ["BINDING_LABEL", "Claims", "EvidenceError", "Verifier", "binding_digest"]
