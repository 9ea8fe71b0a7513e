"""One line each on what `protect --scheme fhe` measured and fine-tuned, for `modelcloak inspect`."""

from __future__ import annotations

from typing import Any

__all__ = ["describe_finetune", "describe_measured"]


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


def describe_finetune(report: Any) -> str:
    """Held-out accuracy of the private part as shipped against the fine-tuned polynomial head."""
    if not isinstance(report, dict) or "finetuned_accuracy" not in report:
        return "not recorded"
    return (
        f"fine-tuned in protect with {report.get('activation')} ({report.get('epochs')} epochs, "
        f"{report.get('train_samples')} samples): held-out accuracy {100 * float(report['finetuned_accuracy']):.1f}% "
        f"against {100 * float(report.get('original_accuracy', float('nan'))):.1f}% for the private part as shipped "
        f"({float(report.get('points_below_original', float('nan'))):+.1f} points below; "
        f"{100 * float(report.get('dropped_in_accuracy', float('nan'))):.1f}% with the activation dropped in, "
        f"{report.get('heldout_samples')} held-out samples)"
    )
