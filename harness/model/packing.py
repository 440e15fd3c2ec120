"""CPU linears through oneDNN with pre-packed weights (`model.cpu_linear`).

On a CPU, `F.linear` with a plain row-major weight goes to MKL's small-M GEMM for fp32 (M = 2 rows cost ~2x one
row) and re-lays the weight out on every call for bf16. oneDNN with the weight reordered once into its blocked
layout (what Inductor's CPU weight prepacking does) is 2-4x faster on SmolLM2's 576 x 49152 lm_head at M = 1..16
on this machine, in both dtypes (numbers: docs/cpu_runtime.md).

The model object stays the same: each `nn.Linear` of the loaded target becomes a `PackedLinear` (a subclass; same
weight Parameter, same state dict, same forward signature) holding one extra packed copy of its weight. Every
method and `hf_generate` run the same modules, so there is one forward path; the packed copy is read-only, which
is right for a frozen target (anything that trains through the module, or runs under autocast, gets the plain
`F.linear` of the same weight).

Exactness: bf16 results are bit-identical to `F.linear` (both are oneDNN); fp32 rounds differently from MKL (up
to ~1e-4 on logits of size ~10), the same order as MKL's own difference between 1 and 7 rows. Lossless checks
compare a method with vanilla on the same model object, so both read the same kernels.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from harness.infra.errors import HarnessError

log = logging.getLogger(__name__)

CHOICES = ("auto", "onednn", "off")
PACKABLE = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Linear):
    """An nn.Linear whose frozen weight is also held in oneDNN's packed layout."""

    packed_weight: torch.Tensor

    def pack(self) -> None:
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)

    def __deepcopy__(self, memo):
        """A copy packs its own weight (oneDNN tensors have no storage to copy)."""
        packed = self.__dict__.pop("packed_weight", None)
        self.__class__ = nn.Linear
        try:
            clone = copy.deepcopy(self, memo)
        finally:
            self.__class__ = PackedLinear
            if packed is not None:
                self.packed_weight = packed
        clone.__class__ = PackedLinear
        clone.pack()
        return clone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != self.weight.dtype or self.weight.requires_grad or x.requires_grad
                or torch.is_autocast_enabled("cpu") or self.packed_weight.dtype != self.weight.dtype):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def set_packed(model: nn.Module, on: bool) -> None:
    """Switch a packed model's linears between the packed and the plain path (A/B timing in one process:
    python -m harness.latency --compare-runtime); the packed copies are kept."""
    for module in model.modules():
        if type(module) in (nn.Linear, PackedLinear) and hasattr(module, "packed_weight"):
            module.__class__ = PackedLinear if on else nn.Linear


def _linears(model: nn.Module) -> list[nn.Linear]:
    """Every plain nn.Linear (quantized and other subclasses are left as they are), each weight once."""
    return [m for m in model.modules() if type(m) is nn.Linear]


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cannot_pack(model: nn.Module, device: torch.device, dtype: torch.dtype, quantization: str) -> str | None:
    """Why this model's linears cannot go through packed oneDNN here (None: they can)."""
    if device.type != "cpu":
        return f"the model is on {device} (packing is a CPU runtime)"
    if quantization != "none":
        return f"model.quantization={quantization} has its own kernels"
    if dtype not in PACKABLE:
        return f"{str(dtype).removeprefix('torch.')} is not fp32 or bf16"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN linear"
    return None


def pack_frozen_head(head: nn.Module, target_linear: str) -> int:
    """A frozen draft head beside a packed target (LoadedModel.linear == 'onednn') runs its linears packed too:
    its fp32 / bf16 CPU linears are rows-few GEMMs (the tree's candidates) where MKL's plain path pays most
    (docs/cpu_runtime.md). Drafting only proposes, so this changes no verified token. Call it last, once the
    weights are final: the packed copy is a snapshot. Returns the linears packed."""
    if target_linear != "onednn":
        return 0
    linears = [m for m in _linears(head) if m.weight.device.type == "cpu" and packable_here(m.weight.dtype)
               and not m.weight.requires_grad]
    for module in linears:
        module.__class__ = PackedLinear
        module.pack()
    return len(linears)


def packable_here(dtype: torch.dtype) -> bool:
    """This torch build and CPU run oneDNN linears in `dtype` (bf16 needs AVX-512 BF16-class support: on an
    AVX2-only CPU a bf16 head beside a packed fp32 target keeps plain linears)."""
    if dtype not in PACKABLE or not torch.backends.mkldnn.is_available() \
            or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packed_rows(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed layout of a frozen [out, in] CPU weight (None where it cannot apply): for a projection
    that is not an nn.Linear (a reduced draft vocabulary's rows of the lm_head)."""
    if weight.device.type != "cpu" or weight.requires_grad or not packable_here(weight.dtype):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def linear_packed(x: torch.Tensor, packed: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through the packed copy where the call allows it (same dtype, no autograd, no autocast),
    else F.linear: the rule PackedLinear.forward follows."""
    if (packed is None or x.dtype != weight.dtype or x.requires_grad or weight.requires_grad
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight.to(x.dtype))
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def pack_linears(model: nn.Module, mode: str, device: torch.device, dtype: torch.dtype,
                 quantization: str = "none") -> str:
    """Apply `model.cpu_linear` (auto | onednn | off) to a loaded, frozen target. Returns what runs: 'onednn' or
    'default'. auto packs where it can and the extra copy of the weights fits in half the available memory;
    onednn where it cannot is one line naming the fix."""
    mode = str(mode or "auto")
    if mode not in CHOICES:
        raise HarnessError(f"model.cpu_linear={mode} is not one of {', '.join(CHOICES)}")
    if mode == "off":
        return "default"
    reason = cannot_pack(model, device, dtype, quantization)
    linears = _linears(model)
    extra = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    available = _available_bytes()
    if reason is None and mode == "auto" and available is not None and extra > available // 2:
        reason = (f"a packed copy of the linears ({extra / 2**20:.0f} MiB) would not fit in half the available "
                  f"memory ({available / 2**20:.0f} MiB)")
    if reason is not None:
        if mode == "onednn":
            raise HarnessError(f"model.cpu_linear=onednn cannot apply: {reason}; use model.cpu_linear=auto or off")
        log.info("model.cpu_linear=auto: plain linears (%s)", reason)
        return "default"
    for module in linears:
        module.__class__ = PackedLinear
        module.pack()
    log.info("model.cpu_linear=%s: %d linears through oneDNN with packed weights (+%.0f MiB)", mode, len(linears),
             extra / 2**20)
    return "onednn"
