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


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU (exact, and fp16 matmuls are slow there) and fp16 on GPU."""
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise HarnessError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]
