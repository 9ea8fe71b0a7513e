"""One line on what `protect --scheme fhe` measured, for `modelcloak inspect`."""

from __future__ import annotations

from typing import Any

__all__ = ["describe_measured"]


def describe_measured(measured: Any) -> str:
    """Parameters, label agreement with the plaintext head, logit error and check tolerance, or why unknown."""
    if not isinstance(measured, dict) or "probe_samples" not in measured:
        return "not measured (bundle made before measurements were recorded)"
    params = measured.get("params") or {}
    agree, total = measured.get("label_agreement"), measured.get("probe_samples")
    line = (
        f"N={params.get('poly_modulus_degree')}, scale 2^{params.get('scale_bits')}: labels equal the plaintext "
        f"head's on {agree}/{total} {measured.get('probe')} (plaintext and encrypted features), "
        f"max logit error {float(measured.get('max_logit_error', float('nan'))):.2g}"
    )
    if measured.get("near_ties_within_error"):
        line += f", {measured['near_ties_within_error']} near-tie(s) within 2x that error"
    if "check_tolerance" in measured:
        line += f"; result check tolerance {float(measured['check_tolerance']):.2g} (relative)"
    if agree != total:
        line += "; LABELS DIFFER from the plaintext head on some inputs"
    return line
