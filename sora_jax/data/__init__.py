"""The online input pipeline: record schema, buckets, packing and the grain pipeline the trainer reads
through. Making datasets (decode, encode, write shards, recaption) is sora_jax.offline."""
