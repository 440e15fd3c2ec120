"""One file per published method; each is a Proposer for the harness loop (or, for hf_generate, a peer runner)."""
