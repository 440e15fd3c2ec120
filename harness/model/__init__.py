"""Target loading: the model cache and loader, quantization, chat templates."""
