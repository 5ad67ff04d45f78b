"""The exported SavedModel: its contract, the export, and labelling files with it."""
