"""Data: JUMP layout reading, site imaging, codecs, shards, manifest, control bank, training pipelines."""
