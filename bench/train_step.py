"""Train-step benchmark: one optimizer step of sora_jax against diffusers + torch on CPU.

Owns the step-time comparison (same model size, batch, shapes, fp32, flow-matching loss) and its plot.
"""
