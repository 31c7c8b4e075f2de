"""Model library: configs, transformer blocks, attention backends, KV cache, FLOP and memory counts."""
