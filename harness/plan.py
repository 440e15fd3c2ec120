"""`specdec-plan`: will this model + quantization + method fit on this GPU? Estimated before any weights load.

    specdec-plan model=vicuna-13b-v1.3 model.quantization=int8 method=medusa gpu_memory=32GB
    specdec-plan model=vicuna-7b-v1.3 mode=train batch_size=4 max_seq_len=2048 method=medusa gpu_memory=48GB
    specdec-plan model=vicuna-13b-v1.3 doc=docs/memory_plan.md        # the none/int8/int4 x 32/48 GB table

The architecture comes from config.json only (model.path, else the cached safetensors folder of the
default model, else conf/architectures.yaml). Every byte count below says what it assumes; the weight
count is exact for the layouts in harness/model/quantization.py (tests/test_plan.py checks it byte for byte against
a loaded model) and the rest are upper-bound style estimates of the peak.

Weights: the decoder's Linear layers at the quantization's layout, everything else (embeddings, lm_head,
norms, biases) in the model dtype, rotary inv_freq buffers in fp32.
  none  numel x dtype bytes
  int8  numel x 1 + out_features x scale bytes (CUDA LLM.int8: fp32 SCB per row; CPU: one scale per row
        in the model dtype)
  int4  NF4 (both devices): ceil(numel / 2) packed bytes + ceil(numel / 64) fp32 absmax + a 16-entry fp32
        code table per layer (bitsandbytes' QuantState, no double quantization)
KV cache: 2 (K, V) x layers x kv_heads x head_dim x (max_seq_len + tree_size) x batch x dtype bytes; a verify
  appends tree_size entries before compaction drops the rejected ones.
Activations (inference, no grad): the larger of the prefill of max_seq_len tokens and one verify forward of
  tree_size tokens over the full cache. Per decoder layer (freed before the next): 5 hidden-sized tensors
  (residual, normed input, q, attention output, o_proj output) + new K/V + 3 intermediate-sized ones (gate,
  up, act(gate) * up) + attention scores and their softmax (heads x T x S, the eager / masked-SDPA path; a
  flash kernel needs none). Logits: T x vocab in the dtype + an fp32 copy (acceptance's softmax); the
  prefill projects only its last position. NF4 with T > 1 dequantizes one weight matrix at a time to the
  dtype: + the largest Linear in the dtype.
Draft head: its parameters in the model dtype (built on the meta device from the method's config or the
  checkpoint's head_config.json); a shared lm_head is the target's and not counted again. A draft model
  (sps) adds its own weights and KV cache.
Training (mode=train; the base frozen, its forward under no_grad): the head in fp32 (AMP master weights) +
  fp32 gradients + AdamW exp_avg and exp_avg_sq (16 bytes/parameter); base activations of one layer for
  batch x max_seq_len tokens; the head's logits K x B x T x vocab in the dtype + fp32 log-softmax + fp32
  gradient; the head's hidden activations, 4 hidden-sized fp32 tensors per position and token.
Overhead (CUDA only): `overhead.fixed_gib` for the CUDA context, cuBLAS workspaces and kernels (0.5-1 GiB on
  current GPUs) + `overhead.fraction` of everything for the caching allocator's fragmentation.
Several GPUs (`gpus=N`, or the visible GPUs when the model config sets `device_map`): accelerate gives each GPU
  a share of the decoder layers, so the decoder Linear weights and the KV cache are divided by N; the rest is
  charged in full to the heaviest GPU (the embeddings and the lm_head, the draft head beside the lm_head, one
  layer's activations and the logits), with its own CUDA context. The verdict compares that per-GPU figure with
  gpu_memory (one card's memory); the total over all GPUs is in the title. An upper bound: auto's split is even
  only to within a layer.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from harness import CONF_DIR
from harness.engine.loop import Proposer
from harness.infra.app import hydra_app
from harness.infra.errors import HarnessError
from harness.model.quantization import NF4_BLOCKSIZE, QUANTIZATIONS, QUANTIZE_LM_HEAD

log = logging.getLogger(__name__)

GIB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}
ARCHITECTURES = CONF_DIR / "architectures.yaml"
NF4_CODE_BYTES = 16 * 4       # bitsandbytes' NF4 code table: 16 fp32 values per quantized layer


# ---------------------------------------------------------------------------------------------
# architecture


@dataclass(frozen=True)
class Architecture:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    source: str

    @staticmethod
    def from_config(config: dict, source: str) -> "Architecture":
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            return Architecture(
                hidden, int(config["intermediate_size"]), int(config["num_hidden_layers"]), heads,
                int(config.get("num_key_value_heads") or heads), int(config.get("head_dim") or hidden // heads),
                int(config["vocab_size"]), int(config.get("max_position_embeddings") or 2048),
                bool(config.get("tie_word_embeddings", False)), bool(config.get("attention_bias", False)),
                bool(config.get("mlp_bias", False)), source)
        except (KeyError, TypeError, ValueError) as exc:
            raise HarnessError(f"{source} lacks a Llama-style field ({exc}); the planner needs hidden_size, "
                               f"intermediate_size, num_hidden_layers, num_attention_heads, vocab_size") from exc

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of one decoder layer's Linear layers: q, k, v, o, gate, up, down."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.num_attention_heads * self.head_dim, \
            self.num_key_value_heads * self.head_dim
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]

    def layer_bias_count(self) -> int:
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return ((q + 2 * kv + self.hidden_size) if self.attention_bias else 0) + \
            ((2 * self.intermediate_size + self.hidden_size) if self.mlp_bias else 0)

    def parameters(self) -> int:
        linear = sum(o * i for o, i in self.linear_shapes())
        per_layer = linear + self.layer_bias_count() + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embeddings + self.hidden_size


def read_architecture(model_cfg) -> Architecture:
    """config.json of model.path, else of the cached GGUF conversion, else conf/architectures.yaml."""
    if model_cfg.get("path"):
        path = Path(str(model_cfg.path)) / "config.json"
        if not path.is_file():
            raise HarnessError(f"model.path={model_cfg.path} has no config.json; point it at a Hugging Face model folder")
        return Architecture.from_config(json.loads(path.read_text()), str(path))
    if model_cfg.get("gguf"):
        from harness.model.loading import gguf_cache_dir

        try:
            path = gguf_cache_dir(model_cfg) / "config.json"
        except HarnessError:
            path = None   # the wheel is missing: the table below still knows the shape
        if path is not None and path.is_file():
            return Architecture.from_config(json.loads(path.read_text()), str(path))
    import yaml

    table = yaml.safe_load(ARCHITECTURES.read_text())
    if model_cfg.get("name") in table:
        return Architecture.from_config(table[model_cfg.name], f"{ARCHITECTURES.name}:{model_cfg.name}")
    raise HarnessError(f"no architecture known for model '{model_cfg.get('name')}'; set model.path=/path/to/model "
                       f"(its config.json is read, no weights) or add it to conf/architectures.yaml")


# ---------------------------------------------------------------------------------------------
# the method: verify tokens per step, draft head, draft model (each method class describes itself)


def method_class(method_cfg) -> type:
    """The class the method config's `_target_` names (conf/method/<name>.yaml); none = vanilla."""
    target = method_cfg.get("_target_")
    if not target:
        return Proposer
    try:
        cls = get_class(str(target))
    except (ImportError, ValueError) as exc:
        raise HarnessError(f"method._target_={target} names no importable class ({exc}); fix _target_ in "
                           f"conf/method/{method_cfg.get('name')}.yaml") from exc
    return cls


def method_verify_tokens(method_cfg) -> int:
    """Tokens in one verify forward (root + draft + extras) for a method config, at its largest setting;
    a `tree_size` in the method config overrides what the method says."""
    if method_cfg.get("tree_size"):
        return int(method_cfg.tree_size)
    cls = method_class(method_cfg)
    if not callable(getattr(cls, "verify_tokens", None)):
        raise HarnessError(f"{cls.__module__}.{cls.__qualname__} does not say its verify size (a verify_tokens(cfg) "
                           f"classmethod): subclass harness.engine.loop.Proposer, or give the plan a tree_size")
    return int(cls.verify_tokens(method_cfg))


def head_parameters(method_cfg, arch: Architecture) -> tuple[str | None, int, int]:
    """(head type, parameter count, positions K) of the method's draft head, built on the meta device."""
    from harness.heads.base import head_class, build_head
    from harness.heads.checkpoint import read_head_config

    head_type, kwargs = getattr(method_class(method_cfg), "head_type", None), dict(method_cfg)
    head_path = method_cfg.get("head_path")
    if head_path and not method_cfg.get("official") and (Path(str(head_path)) / "head_config.json").is_file():
        info = read_head_config(head_path)
        head_type, kwargs = info["head_type"], dict(info["config"])
    if head_type is None:
        return None, 0, 0
    cls = head_class(head_type)
    accepted = inspect.signature(cls.__init__).parameters
    arch_fields = {"intermediate_size": arch.intermediate_size, "num_attention_heads": arch.num_attention_heads,
                   "num_key_value_heads": arch.num_key_value_heads, "head_dim": arch.head_dim,
                   "attention_bias": arch.attention_bias, "mlp_bias": arch.mlp_bias}
    chosen = {k: v for k, v in kwargs.items() if k in accepted and k not in ("self", "hidden_size", "vocab_size")}
    for key, value in arch_fields.items():
        if key in accepted:
            chosen.setdefault(key, value)
    base_config = {"hidden_size": arch.hidden_size, "vocab_size": arch.vocab_size,
                   "max_position_embeddings": arch.max_position_embeddings, **arch_fields}
    with torch.device("meta"):
        head = build_head(head_type, base_config, **chosen)
    return head_type, sum(p.numel() for p in head.parameters()), int(head.num_positions)


# ---------------------------------------------------------------------------------------------
# the estimate


@dataclass
class Row:
    component: str
    bytes: int
    note: str


def _scale_bytes(device: str, dtype_bytes: int) -> int:
    return 4 if device == "cuda" else dtype_bytes


def weight_bytes(arch: Architecture, quantization: str, dtype_bytes: int, device: str) -> tuple[int, int]:
    """(decoder Linear weights at the quantization, everything else) in bytes; exact for harness/model/quantization.py."""
    linear = 0
    for out_features, in_features in arch.linear_shapes():
        numel = out_features * in_features
        if quantization == "none":
            linear += numel * dtype_bytes
        elif quantization == "int8":
            linear += numel + out_features * _scale_bytes(device, dtype_bytes)
        else:
            linear += math.ceil(numel / 2) + math.ceil(numel / NF4_BLOCKSIZE) * 4 + NF4_CODE_BYTES
    linear *= arch.num_hidden_layers
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    assert not QUANTIZE_LM_HEAD, "the planner counts the lm_head in the model dtype (harness/model/quantization.py policy)"
    norms = (2 * arch.num_hidden_layers + 1) * arch.hidden_size
    biases = arch.num_hidden_layers * arch.layer_bias_count()
    rotary = 2 * (arch.head_dim // 2) * 4          # inv_freq + original_inv_freq, fp32
    return linear, (embeddings + norms + biases) * dtype_bytes + rotary


def kv_bytes(arch: Architecture, tokens: int, batch: int, dtype_bytes: int) -> int:
    return 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * tokens * batch * dtype_bytes


def forward_activation_bytes(arch: Architecture, tokens: int, keys: int, dtype_bytes: int) -> int:
    """Transient peak of one decoder layer over `tokens` queries attending to `keys` positions."""
    hidden = 5 * tokens * arch.hidden_size + 2 * tokens * arch.num_key_value_heads * arch.head_dim
    mlp = 3 * tokens * arch.intermediate_size
    scores = 2 * arch.num_attention_heads * tokens * keys
    return (hidden + mlp + scores) * dtype_bytes


def estimate(arch: Architecture, *, quantization: str = "none", dtype: str = "fp16", device: str = "cuda",
             max_seq_len: int = 2048, batch_size: int = 1, tree_size: int = 1, head_params: int = 0,
             head_type: str | None = None, head_positions: int = 1, draft_model: tuple[Architecture, str] | None = None,
             mode: str = "infer", overhead_gib: float = 1.0, overhead_fraction: float = 0.05,
             cpu_linear: str = "auto") -> list[Row]:
    """Component rows (bytes) for one configuration; `Plan` adds the total and the verdict."""
    if quantization not in QUANTIZATIONS:
        raise HarnessError(f"unknown quantization '{quantization}'; use one of {', '.join(QUANTIZATIONS)}")
    if dtype not in DTYPE_BYTES:
        raise HarnessError(f"unknown dtype '{dtype}' for the planner; use fp32, fp16 or bf16")
    if mode not in ("infer", "train"):
        raise HarnessError(f"unknown mode '{mode}'; use mode=infer or mode=train")
    b = DTYPE_BYTES[dtype]
    linear, other = weight_bytes(arch, quantization, b, device)
    layout = {"none": dtype, "int8": ("LLM.int8: int8 + fp32 scale/row" if device == "cuda"
                                      else f"int8 weight-only + {dtype} scale/row"),
              "int4": f"NF4: 4 bit + fp32 absmax/{NF4_BLOCKSIZE} + code table"}[quantization]
    linears = len(arch.linear_shapes()) * arch.num_hidden_layers
    rows = [Row("weights: decoder Linear layers", linear, f"{linears} layers, {layout}"),
            Row("weights: embeddings, lm_head, norms", other,
                f"{dtype}{', lm_head tied' if arch.tie_word_embeddings else ''}; never quantized")]
    if device == "cpu" and quantization == "none" and dtype in ("fp32", "bf16") and cpu_linear != "off":
        packed = linear + arch.vocab_size * arch.hidden_size * b
        rows.append(Row("weights: packed copy for oneDNN (model.cpu_linear)", packed,
                        "a oneDNN-layout copy of every Linear + lm_head; auto skips it when it would not fit, "
                        "model.cpu_linear=off drops it"))
    kv_tokens = max_seq_len + tree_size
    if mode == "infer":   # training runs the base without a cache
        rows.append(Row("KV cache", kv_bytes(arch, kv_tokens, batch_size, b),
                        f"{kv_tokens} tokens (max_seq_len + tree) x batch {batch_size}, {dtype}"))
    if head_params:
        rows.append(Row(f"draft head ({head_type})", head_params * (4 if mode == "train" else b),
                        f"{head_params / 1e6:.1f}M parameters, {'fp32 master' if mode == 'train' else dtype}"))
        if mode == "infer" and device == "cpu" and quantization == "none" and dtype in ("fp32", "bf16") \
                and cpu_linear != "off":   # harness.model.packing.pack_frozen_head, beside the packed target
            rows.append(Row("draft head: packed copy for oneDNN", head_params * b,
                            "its linears' oneDNN-layout copy (an upper bound: norms and embeddings stay unpacked)"))
    if draft_model is not None:
        draft_arch, draft_quant = draft_model
        d_linear, d_other = weight_bytes(draft_arch, draft_quant, b, device)
        rows.append(Row("draft model weights + KV", d_linear + d_other + kv_bytes(draft_arch, kv_tokens, batch_size, b),
                        f"{draft_arch.parameters() / 1e6:.0f}M parameters, quantization {draft_quant}"))
    if mode == "infer":
        prefill = forward_activation_bytes(arch, max_seq_len, max_seq_len, b) * batch_size + arch.vocab_size * (b + 4)
        verify = (forward_activation_bytes(arch, tree_size, kv_tokens, b) + tree_size * arch.vocab_size * (b + 4)) \
            * batch_size
        rows.append(Row("activations + logits (peak forward)", max(prefill, verify),
                        f"max(prefill {max_seq_len} tokens, verify {tree_size} tokens), one layer at a time"))
    if quantization == "int4":
        largest = max(o * i for o, i in arch.linear_shapes())
        rows.append(Row("NF4 dequantized weight (T > 1)", largest * b, "largest Linear in the dtype, transient"))
    if mode == "train":
        tokens = batch_size * max_seq_len
        positions = head_positions if head_params else 0
        rows.append(Row("head gradients + AdamW state", head_params * 12, "fp32 grad + exp_avg + exp_avg_sq"))
        # attention scores are per sequence: heads x L x L for each of the batch_size sequences
        base_act = forward_activation_bytes(arch, tokens, max_seq_len, b) + tokens * arch.hidden_size * b
        rows.append(Row("base forward activations (no grad)", base_act,
                        f"one layer over batch {batch_size} x {max_seq_len} tokens + the final hidden states"))
        rows.append(Row("head activations + logits (train)",
                        positions * tokens * (arch.vocab_size * (b + 4 + 4) + arch.hidden_size * 4 * 4),
                        f"{positions} positions x {tokens} tokens x vocab ({dtype} logits, fp32 log-softmax + grad)"))
    if device == "cuda":
        subtotal = sum(row.bytes for row in rows)
        rows.append(Row("CUDA context + allocator overhead", int(overhead_gib * GIB + overhead_fraction * subtotal),
                        f"{overhead_gib:g} GiB context/workspaces + {overhead_fraction:.0%} fragmentation"))
    return rows


def parse_memory(text) -> int:
    """'32GB' / '32GiB' / '32' (GiB) / '500MB' -> bytes. GPU "GB" sizes are binary (a 32 GB V100 = 32 GiB)."""
    if text is None:
        raise HarnessError("gpu_memory is not set; pass gpu_memory=32GB")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not match:
        raise HarnessError(f"cannot read gpu_memory={text}; write it like gpu_memory=32GB")
    scale = {"": GIB, "k": 1024, "m": 1024 ** 2, "g": GIB, "t": 1024 ** 4}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def fmt_gib(value: int) -> str:
    return f"{value / GIB:.2f}"


# ---------------------------------------------------------------------------------------------
# config -> plan


SPLIT_ROWS = ("weights: decoder Linear layers", "KV cache")   # divided over GPUs by accelerate's layer split
OVERHEAD_ROW = "CUDA context + allocator overhead"


def per_gpu(rows: list[Row], gpus: int, overhead_gib: float, overhead_fraction: float) -> list[Row]:
    """The heaviest GPU's rows when the model's layers are spread over `gpus` GPUs (see the module doc)."""
    if gpus <= 1:
        return rows
    spread = [Row(r.component, -(-r.bytes // gpus), f"{r.note}; 1/{gpus} per GPU (layer split)")
              if r.component in SPLIT_ROWS else r for r in rows if r.component != OVERHEAD_ROW]
    subtotal = sum(r.bytes for r in spread)
    spread.append(Row(OVERHEAD_ROW, int(overhead_gib * GIB + overhead_fraction * subtotal),
                      f"{overhead_gib:g} GiB context/workspaces + {overhead_fraction:.0%} fragmentation, per GPU"))
    return spread


@dataclass
class Plan:
    rows: list[Row]
    total: int
    budget: int | None
    title: str
    gpus: int = 1

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def verdict(self) -> str:
        where = f" per GPU on each of {self.gpus} GPUs" if self.gpus > 1 else ""
        if self.budget is None:
            return f"{self.title}: needs {fmt_gib(self.total)} GiB{where} (no gpu_memory given)"
        word = "fits" if self.fits else "DOES NOT FIT"
        return (f"{self.title}: {word} - needs {fmt_gib(self.total)} GiB{where} of {fmt_gib(self.budget)} GiB "
                f"({self.total / self.budget:.0%})")

    def table(self):
        import pandas as pd

        frame = pd.DataFrame([{"component": r.component, "GiB": fmt_gib(r.bytes), "bytes": r.bytes, "assumption": r.note}
                              for r in self.rows])
        total = {"component": "**total**", "GiB": fmt_gib(self.total), "bytes": self.total, "assumption": ""}
        return pd.concat([frame, pd.DataFrame([total])], ignore_index=True)

    def markdown(self) -> str:
        return self.table().to_markdown(index=False) + "\n\n" + self.verdict()


def _resolve_dtype(dtype, device: str) -> str:
    if dtype in (None, "auto"):
        return "fp16" if device == "cuda" else "fp32"
    return str(dtype)


def plan_from_config(cfg: DictConfig, quantization: str | None = None, gpu_memory=None) -> Plan:
    """A Plan for a composed config (specdec-plan's conf/plan.yaml, or specdec-bench's with its `plan` block)."""
    model_cfg, method_cfg = cfg.model, cfg.method
    plan_cfg = cfg.get("plan") or cfg
    device = str(plan_cfg.get("device") or cfg.get("device") or "cuda")
    if device == "auto":   # specdec-bench's device=auto: plan for the device the run will use
        from harness.model.device import resolve_device

        device = resolve_device("auto").type
    device = device.split(":")[0]
    quantization = quantization or model_cfg.get("quantization") or "none"
    dtype = _resolve_dtype(plan_cfg.get("dtype") or model_cfg.get("dtype"), device)
    arch = read_architecture(model_cfg)
    max_seq_len = int(plan_cfg.get("max_seq_len") or arch.max_position_embeddings)
    tree_size = int(plan_cfg.get("tree_size") or method_verify_tokens(method_cfg))
    head_type, head_params, head_positions = head_parameters(method_cfg, arch)
    draft_model = None
    draft_name = method_cfg.get("draft_model") or method_cfg.get("assistant_model")
    if draft_name:
        from harness.model.loading import model_config

        draft_cfg = model_config(str(draft_name))
        draft_model = (read_architecture(draft_cfg), draft_cfg.get("quantization") or "none")
    overhead = plan_cfg.get("overhead") or {}
    rows = estimate(arch, quantization=quantization, dtype=dtype, device=device, max_seq_len=max_seq_len,
                    batch_size=int(plan_cfg.get("batch_size") or 1), tree_size=tree_size, head_params=head_params,
                    head_type=head_type, head_positions=head_positions, draft_model=draft_model, mode=str(plan_cfg.get("mode") or "infer"),
                    overhead_gib=float(overhead.get("fixed_gib", 1.0)),
                    overhead_fraction=float(overhead.get("fraction", 0.05)),
                    cpu_linear=str(model_cfg.get("cpu_linear") or "auto"))
    budget_text = gpu_memory if gpu_memory is not None else plan_cfg.get("gpu_memory")
    budget = parse_memory(budget_text) if budget_text else None
    gpus = plan_gpus(plan_cfg, model_cfg, device)
    single = sum(r.bytes for r in rows)
    rows = per_gpu(rows, gpus, float(overhead.get("fixed_gib", 1.0)), float(overhead.get("fraction", 0.05)))
    spread = (f", {gpus} GPUs (device_map {model_cfg.get('device_map') or 'auto'}; {fmt_gib(single)} GiB on one)"
              if gpus > 1 else "")
    title = (f"{model_cfg.name} {quantization} {dtype} on {device}, {method_cfg.name} (tree {tree_size}), "
             f"seq {max_seq_len}, batch {int(plan_cfg.get('batch_size') or 1)}, {plan_cfg.get('mode') or 'infer'}"
             f"{spread}")
    return Plan(rows, sum(r.bytes for r in rows), budget, title, gpus)


def plan_gpus(plan_cfg, model_cfg, device: str) -> int:
    """GPUs the model is spread over: `gpus=N` (specdec-plan), else the visible GPUs when the model config sets
    device_map (what specdec-bench will use), else 1."""
    asked = plan_cfg.get("gpus")
    if asked is not None:
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
            raise HarnessError(f"gpus={asked!r} must be an integer >= 1; fix gpus=")
        return asked
    if device == "cuda" and model_cfg.get("device_map") is not None:
        return max(1, torch.cuda.device_count())
    return 1


def check_fits(cfg: DictConfig) -> Plan | None:
    """specdec-bench's guard: with `plan.gpu_memory` set, refuse (one line) a run the planner says cannot fit."""
    plan_cfg = cfg.get("plan")
    if not plan_cfg or not plan_cfg.get("gpu_memory"):
        return None
    plan = plan_from_config(cfg)
    if not plan.fits:
        raise HarnessError(f"{plan.verdict()}; use model.quantization=int8 or int4, a smaller plan.max_seq_len, "
                           f"or a larger plan.gpu_memory (details: specdec-plan model={cfg.model.name} "
                           f"method={cfg.method.name} gpu_memory={plan_cfg.gpu_memory})")
    log.info("%s", plan.verdict())
    return plan


def memory_plan_doc(cfg: DictConfig, gpus=("32GB", "48GB")) -> str:
    """Markdown: the model at none / int8 / int4 side by side, and the verdict against each GPU size."""
    import pandas as pd

    plans = {q: plan_from_config(cfg, quantization=q) for q in QUANTIZATIONS}
    components = list(dict.fromkeys(r.component for p in plans.values() for r in p.rows))
    table = []
    for component in components + ["**total**"]:
        row = {"component (GiB)": component}
        for q, plan in plans.items():
            found = [r.bytes for r in plan.rows if r.component == component]
            row[q] = fmt_gib(plan.total if component == "**total**" else found[0]) if (found or component == "**total**") else "-"
        table.append(row)
    for gpu in gpus:
        budget = parse_memory(gpu)
        table.append({"component (GiB)": f"fits {gpu}?", **{q: ("yes" if p.total <= budget else "**no**") for q, p in plans.items()}})
    first = plans["none"]
    return "\n".join([
        f"### {first.title.replace(' none ', ' ')}", "",
        pd.DataFrame(table).to_markdown(index=False), "",
        f"Architecture from `{read_architecture(cfg.model).source}`; {read_architecture(cfg.model).parameters() / 1e9:.2f}B "
        f"parameters. GPU sizes are GiB (a \"32 GB\" card has 32 GiB).", ""])


# ---------------------------------------------------------------------------------------------
# entry point


DOC_SECTIONS = (  # (title, method config, mode)
    ("Inference, vanilla", "vanilla", "infer"),
    ("Inference, Medusa-1 (conf/method/medusa.yaml: 4 heads with own lm_heads, the 63-node tree)", "medusa", "infer"),
    ("Training that Medusa head (batch doc_train_batch_size x max_seq_len, AdamW, frozen base)", "medusa", "train"),
)


def write_doc(cfg: DictConfig) -> Path:
    """Rewrite everything below DOC_MARKER in `cfg.doc` with the model's tables; the text above is kept."""
    gpus = tuple(cfg.get("doc_gpus") or ("32GB", "48GB"))
    sections = []
    for title, method, mode in DOC_SECTIONS:
        section_cfg = OmegaConf.merge(cfg, {"mode": mode})
        section_cfg.method = OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml")
        if mode == "train":
            section_cfg.batch_size = int(cfg.get("doc_train_batch_size") or 4)
        sections.append(f"## {title}\n\n" + memory_plan_doc(section_cfg, gpus))
    path = Path(str(cfg.doc))
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.is_file() else ""
    header = old.split(DOC_MARKER)[0] if DOC_MARKER in old else (old or DOC_HEADER)
    path.write_text(header + DOC_MARKER + "\n\n" + "\n".join(sections))
    return path


def run_plan(cfg: DictConfig) -> int:
    if cfg.get("doc"):
        print(f"wrote {write_doc(cfg)}")
        return 0
    plan = plan_from_config(cfg)
    print(plan.table().to_markdown(index=False))
    print()
    print(plan.verdict())
    if not plan.fits:
        print(f"error: {cfg.model.name} with quantization={cfg.model.quantization} does not fit gpu_memory="
              f"{cfg.gpu_memory}; try model.quantization=int8 or int4, or a smaller max_seq_len", file=sys.stderr)
        return 2
    return 0


DOC_MARKER = "<!-- generated by specdec-plan doc=...: everything below this line is rewritten -->"
DOC_HEADER = "# Memory plan\n\n"


def _exit_with(code: int) -> None:
    if code:
        sys.exit(code)              # the plan ran; a nonzero code says something does not fit


main = hydra_app("plan", run_plan, _exit_with)


if __name__ == "__main__":
    main()
