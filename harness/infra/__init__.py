"""Infrastructure: errors, the run store and its locks, W&B tracking, the Hydra app shell."""
