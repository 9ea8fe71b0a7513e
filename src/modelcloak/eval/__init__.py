"""The evaluation room: per-split timing, accuracy, extraction attacks, reports and plots."""
