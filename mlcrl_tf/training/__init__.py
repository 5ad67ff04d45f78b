"""The training command: flags, data, strategies, the loop and its summaries."""
