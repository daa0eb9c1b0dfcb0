"""The data pipeline: corpus -> byte-level BPE -> cached token shards -> batches, with the
train/validation split and the leakage measure (docs/data.md)."""
