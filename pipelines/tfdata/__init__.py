"""The tf.data input: reading shards with integrity checks, decoding, preprocessing."""
