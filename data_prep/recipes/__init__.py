"""Corpus recipes: each writes manifests that ``hpc-asr prep fbank`` turns into shards."""
