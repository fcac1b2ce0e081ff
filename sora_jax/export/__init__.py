"""Weight formats of PyTorch ecosystems (diffusers, original Wan2.1), both directions."""
