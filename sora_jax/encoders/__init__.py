"""The frozen encoders that prepare, eval and sample run around the DiT: video VAEs, text encoders, tokenizer.

Nothing here imports train/ or model/: the encoders are separate networks loaded from their own files.
"""
