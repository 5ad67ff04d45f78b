"""The paper's model, losses and optimizer; no data files, no flags."""
