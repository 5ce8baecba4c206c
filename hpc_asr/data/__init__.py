"""Data: audio and FBANK features, manifests, HDF5 shards, text, tokenizers, the loader."""
