"""Draft heads: the base class and registry, checkpoints, published-checkpoint layouts."""
