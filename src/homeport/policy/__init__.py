"""Access decisions: pure functions that return a verdict and a reason."""
