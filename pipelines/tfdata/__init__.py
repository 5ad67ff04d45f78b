"""The tf.data input: shards read with integrity checks, decoded, preprocessed (docs/data.md)."""
