"""The Wan2.1-compatible spacetime DiT, its attention backends, RoPE, text encoder and VAEs."""
