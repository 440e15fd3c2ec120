"""Quantized targets: `model.quantization: none | int8 | int4`.

On CUDA the weights load through bitsandbytes; the CPU path is filled in by the quantization issue.
"""

from __future__ import annotations

import torch

from harness.errors import HarnessError

QUANTIZATIONS = ("none", "int8", "int4")


def check_quantization(quantization: str, device: torch.device) -> None:
    if quantization not in QUANTIZATIONS:
        raise HarnessError(f"unknown model.quantization '{quantization}'; use one of {', '.join(QUANTIZATIONS)}")
    if quantization != "none":
        raise HarnessError(f"model.quantization={quantization} is not available yet; use model.quantization=none")


def quant_load_kwargs(quantization: str, device: torch.device, dtype: torch.dtype) -> dict:
    return {}


def quantize_after_load(model: torch.nn.Module, quantization: str, device: torch.device) -> torch.nn.Module:
    return model
