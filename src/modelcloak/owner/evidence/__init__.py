"""Evidence verifiers behind one interface (see base.py)."""

from modelcloak.owner.evidence.base import BINDING_LABEL, Claims, EvidenceError, Verifier, binding_digest

__all__ = ["BINDING_LABEL", "Claims", "EvidenceError", "Verifier", "binding_digest"]
