"""Offline jobs that make and improve datasets: prepare (decode, encode, write shards), recaption, the
synthetic demo videos, and the resumable chunked job runner (local or Beam) they share."""
