"""Latent clip datasets: video decoding, prepare and recaption, record schema, TFDS builder, buckets,
packing, the grain pipeline and the synthetic demo data."""
