"""Device mesh construction and the logical-axis sharding rules."""
