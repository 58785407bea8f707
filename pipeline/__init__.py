"""Listener-augmented GRPO: the algorithm (pure modules) and the driver. See README.md."""
