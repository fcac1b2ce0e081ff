"""The trainer: state, step, optimizer, EMA, checkpoints, metrics and the loop."""
