"""Data: question files, ShareGPT, training examples, token datasets, the feature cache, self-written prompts and the generation backends of distillation."""
