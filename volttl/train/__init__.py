"""Training: optimiser and schedule, losses, metrics, the loop, checkpoints."""
