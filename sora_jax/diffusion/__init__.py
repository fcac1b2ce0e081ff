"""Diffusion: the rectified-flow training objective (flow.py) and its ODE samplers (samplers.py).

Pure JAX functions of arrays and the `diffusion` config group; no model, data or trainer imports.
"""
