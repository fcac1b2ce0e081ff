"""Latent clip datasets: record schema, TFDS builder, grain pipeline, synthetic demo data."""
