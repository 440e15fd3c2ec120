"""The engine: the one draft->verify loop, the target, trees, acceptance, sizing, metrics."""
