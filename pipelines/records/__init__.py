"""TFRecord files: the schema, checking images, writing and finding shards (docs/data.md)."""
