"""Vanilla decoding: the degenerate proposer. An empty draft makes every verify step one target
forward of the pending token, i.e. plain autoregressive decoding with a KV cache."""

from harness.engine.loop import Proposer


class VanillaProposer(Proposer):
    name = "vanilla"
