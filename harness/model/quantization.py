"""Quantized targets: `model.quantization: none | int8 | int4`, and how much memory the weights take.

Schemes (one per device kind; `quantization_signature` names the one in use):

| quantization | CUDA (bitsandbytes, via transformers' BitsAndBytesConfig) | CPU                                   |
|--------------|-----------------------------------------------------------|---------------------------------------|
| int8         | LLM.int8 (`load_in_8bit`, outlier threshold 6.0): int8    | weight-only int8, per-output-channel  |
|              | weights + one fp32 scale per row (SCB)                    | symmetric scales (fp32), fp activations |
| int4         | NF4 (`load_in_4bit`, blocksize 64, fp32 absmax per block, | the same bitsandbytes NF4 (its CPU     |
|              | no double quantization), compute dtype = model dtype      | backend), compute dtype fp32           |

Only the decoder's Linear layers are quantized. Embeddings, norms and the lm_head stay in the model
dtype, on both devices: bitsandbytes skips the output embedding by default, a tied lm_head
(SmolLM2) would need a second, int8 copy of the 49k x 576 matrix (more memory, not less), and the
harness reads lm_head.weight (Target's mask dtype, the heads' shared projection and base identity).

The CPU int8 path is ours (WeightOnlyInt8Linear, ~30 lines over torch's `_weight_int8pack_mm`, the
kernel gpt-fast and torchao use for int8 weight-only on CPU) rather than torch.ao's
`quantize_dynamic`, for two reasons: torch.ao.quantization is deprecated (it warns "will be removed"),
and dynamic quantization picks ONE activation scale per forward from all its tokens, so a token's
logits depend on which other tokens share the forward (measured on the tiny Llama: 5e-2 max logit
difference between a 5-token verify forward and 5 single-token forwards, vs 1e-6 in fp32). Weight-only
int8 leaves activations in floating point, so it is as batch-invariant as fp32 (0.0 difference on
the kernel, 1e-6 on the model).

Lossless semantics. Speculative decoding over a quantized target is lossless with respect to THE
QUANTIZED TARGET: it emits what vanilla decoding of the same quantized model emits (greedy: token
for token; sampling: the same distribution), not what the fp16/fp32 model emits. The lossless check
(`reference=` in specdec-bench) therefore compares with a vanilla run on the same quantization.
Caveat for CUDA int8: LLM.int8 moves every input column that holds an outlier (|x| > 6) in ANY row of
the forward to fp16, so a token's result depends slightly on the other tokens verified with it; rare
greedy divergences from vanilla-int8 at near-ties are a property of that kernel, not a method bug
(report the lossless rate; NF4 and the CPU schemes are weight-only and have no such effect).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from harness.infra.errors import HarnessError
from harness.model.packing import PackedLinear

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8", "int4")
QUANTIZE_LM_HEAD = False      # policy, see the module docstring; plan.py counts the lm_head accordingly
NF4_BLOCKSIZE = 64            # bitsandbytes' default 4-bit blocksize (one fp32 absmax per 64 weights)
NF4_DOUBLE_QUANT = False      # transformers' default bnb_4bit_use_double_quant
LLM_INT8_THRESHOLD = 6.0      # transformers' default llm_int8_threshold
BNB_MIN_VERSION = "0.50"      # first release whose CPU backend we checked (0.50.2: int8 + NF4 on CPU)


def scheme(quantization: str, device_type: str) -> str:
    """The concrete scheme behind a quantization name on a device kind ("cuda" or "cpu")."""
    if quantization == "none":
        return "none"
    if quantization == "int8":
        return "bnb-llm-int8" if device_type == "cuda" else "int8-weight-only-per-channel"
    return f"bnb-nf4-blocksize{NF4_BLOCKSIZE}"


def uses_bitsandbytes(quantization: str, device: torch.device) -> bool:
    return quantization == "int4" or (quantization == "int8" and device.type == "cuda")


def check_quantization(quantization: str, device: torch.device) -> None:
    """One-line refusal of an unknown name, an unsupported device, or a missing bitsandbytes."""
    if quantization not in QUANTIZATIONS:
        raise HarnessError(f"unknown model.quantization '{quantization}'; use one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return
    if device.type not in ("cuda", "cpu"):
        raise HarnessError(f"model.quantization={quantization} runs on cuda or cpu, not {device.type}; "
                           f"use device=cpu or model.quantization=none")
    if uses_bitsandbytes(quantization, device) and importlib.util.find_spec("bitsandbytes") is None:
        raise HarnessError(f"model.quantization={quantization} on {device.type} needs bitsandbytes; "
                           f"run `pip install 'bitsandbytes>={BNB_MIN_VERSION}'`")
    if quantization == "int8" and device.type == "cpu" and not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise HarnessError(f"model.quantization=int8 on CPU needs torch>=2.4 (this is {torch.__version__}); "
                           f"upgrade torch or use model.quantization=none")


def quant_load_kwargs(quantization: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Extra `from_pretrained` kwargs: bitsandbytes quantizes while loading, straight onto the device."""
    if not uses_bitsandbytes(quantization, device):
        return {}
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=LLM_INT8_THRESHOLD)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                    bnb_4bit_use_double_quant=NF4_DOUBLE_QUANT)
    target = device.index if device.type == "cuda" and device.index is not None else device.type
    return {"quantization_config": config, "device_map": {"": target}}


class WeightOnlyInt8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T + bias with int8 `weight` [out, in] and one symmetric scale per
    output row. Activations stay in floating point, so results do not depend on the batch."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        # symmetric per row: the row's largest |w| maps to 127 (-128 unused keeps the grid symmetric)
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        quantized = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", quantized.contiguous())                 # [out, in] int8
        self.register_buffer("scales", scales.to(linear.weight.dtype))        # [out] model dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def quantize_linears_int8(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` (in place) with WeightOnlyInt8Linear; returns the count."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) in (nn.Linear, PackedLinear):      # a packed one (model.cpu_linear) is a Linear too
            setattr(module, name, WeightOnlyInt8Linear(child))
            count += 1
        else:
            count += quantize_linears_int8(child)
    return count


def quantize_after_load(model: nn.Module, quantization: str, device: torch.device) -> nn.Module:
    """CPU int8: quantize the decoder body's Linear layers (bitsandbytes schemes are done at load)."""
    if quantization == "int8" and device.type == "cpu":
        body = getattr(model, model.base_model_prefix)
        count = quantize_linears_int8(body)   # the lm_head lives outside the body: kept (QUANTIZE_LM_HEAD)
        log.info("int8 weight-only: %d Linear layers quantized, lm_head and embeddings kept in %s", count,
                 model.get_output_embeddings().weight.dtype)
    return model


# ---------------------------------------------------------------------------------------------
# measured weight memory


def _quant_state_tensors(param) -> list[torch.Tensor]:
    """bitsandbytes keeps its scales outside parameters()/buffers(): NF4 quant_state, LLM.int8 SCB."""
    found = []
    state = getattr(param, "quant_state", None)
    while state is not None:   # NF4 with double quantization nests a second state for the absmax
        found += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None),
                              getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)
    scb = getattr(param, "SCB", None)
    if isinstance(scb, torch.Tensor):
        found.append(scb)
    return found


def weight_memory_bytes(model: nn.Module) -> int:
    """Bytes of parameters + buffers + quantization scales, each storage counted once (tied weights)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal total
        if tensor.device.type == "meta":
            return
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()

    for param in model.parameters():
        add(param)
        for extra in _quant_state_tensors(param):
            add(extra)
    for buffer in model.buffers():
        add(buffer)
    return total


# ---------------------------------------------------------------------------------------------
# heads trained over a quantized base


def quantization_signature(model_cfg, device: str | torch.device = "auto") -> dict:
    """What a head checkpoint records about its base's quantization (save_head(..., extra=
    {"base_quantization": quantization_signature(cfg.model, loaded.device)}))."""
    from harness.model.device import resolve_device

    quantization = (model_cfg.get("quantization") if hasattr(model_cfg, "get") else None) or "none"
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    return {"quantization": quantization, "scheme": scheme(quantization, dev.type),
            "lm_head_quantized": False if quantization == "none" else QUANTIZE_LM_HEAD}


def _trained_quantization(head_meta: dict) -> str:
    record = head_meta.get("base_quantization") or (head_meta.get("base") or {}).get("quantization")
    if isinstance(record, dict):
        return record.get("quantization") or "none"
    # no record: the head predates quantized training, which was refused until it existed -> none
    return record or "none"


def check_head_quantization(head_meta: dict, loaded) -> None:
    """Warn (never refuse) when a head trained over one base quantization runs on another: the hidden
    states it reads shift slightly, so acceptance may drop; outputs stay lossless either way."""
    trained = _trained_quantization(head_meta)
    running = getattr(loaded, "quantization", "none") or "none"
    if trained != running:
        log.warning("this draft head was trained over a base with quantization=%s but runs on quantization=%s; "
                    "its acceptance may be lower (output stays lossless) - train the head with "
                    "model.quantization=%s or run with model.quantization=%s", trained, running, running, trained)
