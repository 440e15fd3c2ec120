"""Device and dtype resolution: the one place `auto` is decided (the loader, the quantizer, the planner
and the feature cache all ask here)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from harness.infra.errors import HarnessError

log = logging.getLogger(__name__)

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


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX): without it oneDNN widens every bf16
    GEMM to fp32 and pays for the conversion (measured on an AVX2-only EPYC: 15 GFLOPS bf16 against 72 fp32,
    2 threads). Non-Linux: assumed present (nothing to read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def warn_slow_bf16(dtype: torch.dtype, device: torch.device, what: str = "the model") -> None:
    """One warning when bf16 is asked for on a CPU without bf16 matmul units (it runs, several times slower)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16_matmul():
        log.warning("%s runs in bf16 on a CPU without AVX-512 BF16 or AMX: every bf16 matmul is emulated, several "
                    "times slower than fp32 here; use fp32 (model.dtype=fp32, training.bf16=false)", what)
