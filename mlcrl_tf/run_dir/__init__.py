"""A training run's directory: its Config, run.json, checkpoints and lock."""
