"""Metrics, evaluating checkpoints and exports, reports and class activation maps."""
