"""Diffusion: the rectified-flow objective (flow.py), its ODE samplers (samplers.py), a training
micro-batch's noise, sigma and caption dropout (training_inputs.py) and given frames (conditioning.py).

Pure JAX functions of arrays and the `diffusion` config group; no model, data or trainer imports.
"""
