"""Device and dtype resolution: the one place `auto` is decided (the loader, the quantizer, the planner
and the feature cache all ask here)."""

from __future__ import annotations

import torch

from harness.infra.errors import HarnessError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_devices(model: torch.nn.Module) -> tuple[torch.device, ...]:
    """The devices a model's weights live on: one, or several for a model spread by model.device_map."""
    return tuple(dict.fromkeys(p.device for p in model.parameters()))


def lm_head_device(model: torch.nn.Module) -> torch.device:
    """Where the logits come out, and where draft heads (which read the final hidden states) belong."""
    weight = getattr(model.get_output_embeddings(), "weight", None)
    return weight.device if weight is not None else next(model.parameters()).device


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU (exact, and fp16 matmuls are slow there) and fp16 on GPU."""
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise HarnessError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]
