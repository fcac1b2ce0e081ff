"""The Wan2.1-compatible spacetime DiT, its attention backends, RoPE, layers and FLOP counts."""
