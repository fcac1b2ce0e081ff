"""Flow-matching objective (sigma sampling, interpolation, loss) and ODE samplers."""
