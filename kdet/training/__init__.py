"""Training controls: optimizers, schedules, freezing, strategies."""
