"""EAGLE (Li et al. 2024, arXiv:2401.15077) and EAGLE-2 (arXiv:2406.16858): a one-layer draft model that
autoregresses on the target's features.

Head (the layout of the official `eagle/model/cnets.py`, so published checkpoints load by name):
    x_t   = fc([embed(x_{t+1}) ; f_t])                2H -> H, with bias (config `bias`, default true)
    f^_{t+1} = decoder layers(x_t)                    Llama layers; layer 0 has NO input_layernorm
    logits = lm_head(f^_{t+1})                        the frozen target lm_head (predicts x_{t+2})
f_t is the target's final (normed) hidden state at t; the embedding and lm_head are the target's own
(frozen, never stored). Drafting a chain feeds the head its own f^ with the drafted token.

Training (EAGLE-1 `eagle/train/main.py`): regress f_{t+1} with SmoothL1 (weight v_weight 1.0) plus the
cross-entropy of lm_head(f^) against the target's distribution softmax(lm_head(f_{t+1})) (weight
p_weight 0.1); inputs get uniform noise (rand - 0.5) * 0.2 * 512 / T (U(-0.1, 0.1) at T = 512, as the
official AddUniformNoise scales it by sequence length). The recipe (AdamW lr 3e-5, betas (0.9, 0.95),
grad clipping by VALUE 0.5, 2000 warm-up steps) is conf/train/eagle_*.yaml.

Decoding, through the harness loop (lossless by construction: the harness verifies and accepts):
- `tree: static` (EAGLE-1): the published 25-node tree of index paths; node [r0, .., rd] is the rank-rd
  token of the head's distribution *given the path* [r0, .., r(d-1)] (the head is autoregressive,
  unlike Medusa's per-position heads).
- `tree: dynamic` (EAGLE-2): top_k children of the root; then `depth` times expand the top_k candidates
  with the best path confidence (cumulative log-prob), each giving top_k children; finally keep the
  `total_token - 1` best candidates of all (a prefix-closed set: a child's score never beats its
  parent's). `total_token` counts the root, as in EAGLE-2; the tree reaches depth `depth + 1`.
  `total_token: auto` sizes every step's tree on the hardware (harness/engine/sizing.py): the sum of the kept
  nodes' path probabilities is EAGLE-2's own estimate of the accepted length; the step keeps the n
  nodes that maximise (1 + c * sum) / (draft time + verify latency(n + 1)), c calibrating the head's
  confidence against what the target actually accepted.

Sampling (temperature > 0): candidates are the top-ranked tokens, drawn deterministically, so
`q_draft = None` and the shared rejection sampling treats each as a one-hot proposal (accept x with
p(x); on rejection remove x from p) -- EAGLE-2's own evaluate_posterior rule, lossless for any draft.
`sample_draft: true` (static tree only) is EAGLE-1's variant: children drawn without replacement from
the head's softmax(logits / T), each with its q row (the head's distribution renormalised without the
earlier siblings), lossless through the same recursive rejection sampling.

The head keeps its own KV cache over committed positions: pair (f_t, x_{t+1}) sits at position t. After
each step the speculative entries are dropped and the committed path is re-read with the *target's*
features (ctx.hidden) paired with the tokens that follow them.
"""

from __future__ import annotations

import logging
from pathlib import Path
import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb)

from harness.engine.loop import Clock, DecodeContext, Draft, Proposer, Step
from harness.engine.rng import categorical
from harness.engine.sizing import keep_most_likely, make_sizer
from harness.engine.tree import best_nodes, index_tree, preset_paths, subtree
from harness.heads.base import BaseHandles, DraftHead, build_head, resolve_draft_dtype
from harness.heads.checkpoint import (check_dims, check_state_dict, has_published_layout, load_or_init_head,
                                      published_weights, read_published_config, read_tensors)
from harness.infra.errors import HarnessError

log = logging.getLogger(__name__)

OFFICIAL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MEDUSA_OFFICIAL_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")   # a Medusa folder is not ours

# The published EAGLE-1 tree (eagle/model/choices.py, named `mc_sim_7b_63` there after Medusa's file):
# 25 nodes, depth 5, 4 candidates at depth 1.
EAGLE_TREE_25 = [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0],
                 [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1], [1, 0, 0],
                 [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]
# A CPU preset: each depth costs one head layer plus one vocabulary projection (~6.5 ms on SmolLM2's
# 576 x 49152 lm_head on 2 cores), so few levels: two guesses at depth 1, the top chain to depth 3.
EAGLE_TREE_CPU_5 = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]
TREES = {"eagle_25": EAGLE_TREE_25, "eagle_cpu_5": EAGLE_TREE_CPU_5}


def named_tree(tree_choices: str | list) -> list[list[int]]:
    """A preset name (TREES) or a list of index paths -> the index paths."""
    return preset_paths(tree_choices, TREES, "tree_choices")

# the architecture fields an EAGLE head copies from its target (EAGLE builds its layer from the target's
# config.json with num_hidden_layers = 1)
ARCH_FIELDS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
               "hidden_act", "attention_bias", "mlp_bias", "max_position_embeddings")


def _get(config, key, default=None):
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return default if value is None else value


def rope_parameters(config) -> dict:
    """RoPE settings of a HF config or a config.json dict (legacy rope_theta / rope_scaling included)."""
    if isinstance(config, dict):
        keys = ("rope_theta", "rope_scaling", "rope_parameters")
        params = LlamaConfig(**{k: config[k] for k in keys if config.get(k) is not None}).rope_parameters
    else:
        params = getattr(config, "rope_parameters", None)
        if not params:
            params = {"rope_type": "default", "rope_theta": float(getattr(config, "rope_theta", None) or 10000.0)}
    return {k: v for k, v in dict(params).items()}


def arch_from_config(config) -> dict:
    """The head's architecture kwargs from a target (or official EAGLE) config."""
    heads = int(_get(config, "num_attention_heads"))
    hidden = int(_get(config, "hidden_size"))
    return dict(intermediate_size=int(_get(config, "intermediate_size")), num_attention_heads=heads,
                num_key_value_heads=int(_get(config, "num_key_value_heads", heads)),
                head_dim=int(_get(config, "head_dim", hidden // heads)),
                rms_norm_eps=float(_get(config, "rms_norm_eps", 1e-6)), hidden_act=str(_get(config, "hidden_act", "silu")),
                attention_bias=bool(_get(config, "attention_bias", False)), mlp_bias=bool(_get(config, "mlp_bias", False)),
                max_position_embeddings=int(_get(config, "max_position_embeddings", 4096)),
                rope_parameters=rope_parameters(config))


# ---------------------------------------------------------------------------------------------
# the head


class EagleAttention(nn.Module):
    """Llama self-attention; the caller decides what the queries see (cache, tree mask, unrolled chains)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=bias)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, N, H] -> q [B, heads, N, d], k and v [B, kv_heads, N, d] (RoPE applied)."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def out(self, attended: torch.Tensor) -> torch.Tensor:
        """[B, heads, N, d] -> [B, N, H]."""
        batch, _, length, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class EagleLayer(nn.Module):
    """A Llama decoder layer; the first has no input_layernorm (its input is the fc fusion, not a residual
    stream), as in the official cnets.py, so the state-dict names match the published checkpoints."""

    def __init__(self, config: LlamaConfig, first: bool):
        super().__init__()
        self.input_layernorm = None if first else LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = EagleAttention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, attend) -> torch.Tensor:
        """attend(self_attn, normed x) -> attention output [B, N, H] (the caller's masking and cache)."""
        normed = x if self.input_layernorm is None else self.input_layernorm(x)
        x = x + attend(self.self_attn, normed)
        return x + self.mlp(self.post_attention_layernorm(x))


def _attend(q, k, v, mask=None, causal=False) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads; mask [.., Nq, Nk] bool (True = visible)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)


class HeadCache:
    """The draft head's own KV cache, per layer [1, kv_heads, capacity, d]: committed pairs first, then the
    current step's speculative entries. `length` entries are valid; crop() forgets the rest."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, device, capacity: int = 512):
        self.shape = (1, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(self.shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(self.shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0

    def _fit(self, needed: int) -> None:
        capacity = self.keys[0].shape[2]
        if needed <= capacity:
            return
        grown = max(2 * capacity, needed)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_empty(old.shape[0], old.shape[1], grown, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [1, kv_heads, m, d] after the valid entries; return all keys/values so far."""
        end = self.length + k.shape[2]
        self._fit(end)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, count: int) -> None:
        self.length += count

    def crop(self, length: int) -> None:
        self.length = length


class EagleHead(DraftHead):
    """EAGLE draft head: fc fusion + `num_layers` Llama layers over the target's frozen embedding/lm_head."""

    head_type = "eagle"

    def __init__(self, hidden_size: int, vocab_size: int, intermediate_size: int | None = None,
                 num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
                 head_dim: int | None = None, rms_norm_eps: float = 1e-6, hidden_act: str = "silu",
                 attention_bias: bool = False, mlp_bias: bool = False, max_position_embeddings: int = 4096,
                 rope_parameters: dict | None = None, num_layers: int = 1, fc_bias: bool = True,
                 num_positions: int = 4, train_steps: int = 1, v_weight: float = 1.0, p_weight: float = 0.1,
                 noise_std: float = 0.2, noise_ref_length: int | None = 512):
        if intermediate_size is None or num_attention_heads is None:
            raise HarnessError("an EAGLE head copies its target's architecture: build it with "
                               "baselines.eagle.build_eagle_head(model.config, ...) or give intermediate_size and "
                               "num_attention_heads")
        num_key_value_heads = num_key_value_heads or num_attention_heads
        head_dim = head_dim or hidden_size // num_attention_heads
        rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        super().__init__(dict(hidden_size=hidden_size, vocab_size=vocab_size, intermediate_size=intermediate_size,
                              num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                              head_dim=head_dim, rms_norm_eps=rms_norm_eps, hidden_act=hidden_act,
                              attention_bias=attention_bias, mlp_bias=mlp_bias,
                              max_position_embeddings=max_position_embeddings, rope_parameters=rope_parameters,
                              num_layers=num_layers, fc_bias=fc_bias, num_positions=num_positions,
                              train_steps=train_steps, v_weight=v_weight, p_weight=p_weight, noise_std=noise_std,
                              noise_ref_length=noise_ref_length))
        if num_layers < 1 or num_positions < 1 or train_steps < 1:
            raise HarnessError("an EAGLE head needs num_layers >= 1, num_positions >= 1 and train_steps >= 1")
        self.llama_config = LlamaConfig(
            hidden_size=hidden_size, intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, head_dim=head_dim, rms_norm_eps=rms_norm_eps,
            hidden_act=hidden_act, attention_bias=attention_bias, mlp_bias=mlp_bias, vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings, rope_parameters=rope_parameters, num_hidden_layers=num_layers)
        self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=fc_bias)
        self.layers = nn.ModuleList(EagleLayer(self.llama_config, first=i == 0) for i in range(num_layers))
        self.rotary = LlamaRotaryEmbedding(self.llama_config)   # inv_freq is a non-persistent buffer: not saved
        self.positions = int(num_positions)
        self.train_steps = int(train_steps)
        self.v_weight, self.p_weight = float(v_weight), float(p_weight)
        self.noise_std, self.noise_ref_length = float(noise_std), noise_ref_length
        self.last_losses: dict[str, float] = {}

    # -- the published checkpoint layout (yuhuili/EAGLE-*; EAGLE-1 and EAGLE-2 share these checkpoints):
    # `config.json` (a Llama config with num_hidden_layers = 1, optional `bias` for fc) + `pytorch_model.bin`
    # or `model.safetensors` holding the official cnets.py `Model`:
    #     embed_tokens.weight                          a copy of the target's embedding (dropped; checked)
    #     fc.weight [H, 2H], fc.bias [H]               fc.bias absent = bias-free fc
    #     layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers.{i}.mlp.{gate,up,down}_proj.weight
    #     layers.{i}.post_attention_layernorm.weight   layers.{i>0}.input_layernorm.weight (none in layer 0)
    # This class uses the same names, so the mapping is: drop embed_tokens and rotary buffers, keep the rest.

    @classmethod
    def is_published(cls, folder) -> bool:
        return (has_published_layout(folder, OFFICIAL_WEIGHTS)
                and not has_published_layout(folder, MEDUSA_OFFICIAL_WEIGHTS))

    @classmethod
    def from_official(cls, folder, loaded, **options) -> "EagleHead":
        """A published EAGLE(-2) head folder -> EagleHead on loaded's device and dtype, eval, frozen."""
        if options:
            raise HarnessError(f"a published EAGLE head takes no options (got {sorted(options)})")
        folder = Path(folder)
        config = read_published_config(folder)
        check_dims(config, loaded, folder, "EAGLE")
        tensors = read_tensors(published_weights(folder, OFFICIAL_WEIGHTS, "EAGLE"))
        if "fc.weight" not in tensors:
            raise HarnessError(f"{folder} has no fc.weight: not an EAGLE-1/2 head (EAGLE-3 heads are not supported)")
        embedding = tensors.get("embed_tokens.weight")
        target_embedding = loaded.model.get_input_embeddings().weight
        if embedding is not None and embedding.shape == target_embedding.shape:
            rows = torch.linspace(0, embedding.shape[0] - 1, 16).long()
            ours = target_embedding.detach()[rows.to(target_embedding.device)].float().cpu()
            if not torch.allclose(embedding[rows].float(), ours, rtol=2e-2, atol=1e-3):
                raise HarnessError(f"EAGLE head {folder} carries another model's embedding; pick the head published "
                                   f"for this target model")
        layers = 1 + max(int(key.split(".")[1]) for key in tensors if key.startswith("layers."))
        kwargs = arch_from_config(config)
        kwargs.update(hidden_size=int(config.get("hidden_size", loaded.model.config.hidden_size)),
                      vocab_size=int(config.get("vocab_size", loaded.model.config.vocab_size)),
                      num_layers=layers, fc_bias="fc.bias" in tensors)
        head = build_head("eagle", loaded.model.config, **kwargs)
        state = official_state_dict(tensors)
        check_state_dict(head.state_dict(), state, str(folder), "EAGLE layout", "is it an EAGLE-1/2 head? re-download it")
        head.load_state_dict(state)
        log.info("loaded the published EAGLE head %s (%d layer(s), fc bias %s)", folder, layers, "fc.bias" in tensors)
        return head.to(device=loaded.head_device, dtype=loaded.dtype).eval().requires_grad_(False)

    @classmethod
    def kwargs_from_base(cls, base_config, kwargs: dict) -> dict:
        """Fill the architecture fields the caller did not give from the target's config."""
        merged = arch_from_config(base_config)
        merged.update({k: v for k, v in kwargs.items() if v is not None})
        return merged

    @property
    def num_positions(self) -> int:
        """Positions the teacher-forced unroll (top-k accuracy) reports; drafting depth is the tree's."""
        return self.positions

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        return len(self.layers), self.llama_config.num_key_value_heads, self.llama_config.head_dim

    def fuse(self, features: torch.Tensor, next_tokens: torch.Tensor, base: BaseHandles) -> torch.Tensor:
        """[embed(x_{t+1}) ; f_t] -> [.., H]: the embedding first, as in EAGLE's cnets.py."""
        embeds = base.embed(next_tokens).to(features.dtype)
        return self.fc(torch.cat([embeds, features], dim=-1))

    # -- decoding: one forward over m new pairs against the head's cache

    def forward_cached(self, features: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
                       visible: torch.Tensor | None, cache: HeadCache, base: BaseHandles) -> torch.Tensor:
        """features [m, H], next_tokens [m], positions [m]; visible [m, cache.length + m] bool (None: causal
        over the new rows, everything cached visible). Appends m entries to the cache; returns f^ [m, H]."""
        x = self.fuse(features, next_tokens, base)[None]
        cos, sin = self.rotary(x, positions[None])
        count = x.shape[1]
        if visible is None:
            past = cache.length
            visible = torch.ones(count, past + count, dtype=torch.bool, device=x.device).tril(diagonal=past)
        mask = visible[None, None]

        def attend(layer_index, attention, normed):
            q, k, v = attention.qkv(normed, cos, sin)
            keys, values = cache.extend(layer_index, k, v)
            return attention.out(_attend(q, keys, values, mask))

        for index, layer in enumerate(self.layers):
            x = layer(x, partial(attend, index))
        cache.advance(count)
        return x[0]

    # -- training: teacher-forced tokens, the head's own features

    def unroll(self, hidden: torch.Tensor, input_ids: torch.Tensor, base: BaseHandles, steps: int,
               project: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [B, T, H] (target features, possibly noised), input_ids [B, T] ->
        features [S, B, T, H] ([j, b, t] = f^_{t+j+1}) and logits [S, B, T, V] ([j, b, t] predicts x_{t+j+2});
        logits None with project=False (training projects only the rows its loss reads).

        Step 0 reads the true pairs (f_t, x_{t+1}) under a causal mask. Step j >= 1 is, for every origin t
        at once, what drafting a chain from t does: the pair (f^_{t+j}, x_{t+j+1}) at position t + j,
        attending to the true pairs 0..t and to the chain's own earlier steps (each origin has its own
        chain keys). Rows whose tokens run past the end read padding (token 0) and must be masked out.
        """
        batch, length, _ = hidden.shape
        device = hidden.device
        padded = torch.cat([input_ids, input_ids.new_zeros(batch, steps + 1)], dim=1)
        base_positions = torch.arange(length, device=device)[None].expand(batch, length)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        true_keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        chain_keys: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]
        features, outputs = hidden, []
        for step in range(steps):
            x = self.fuse(features, padded[:, step + 1: step + 1 + length], base)
            cos, sin = self.rotary(x, base_positions + step)

            def attend(layer_index, attention, normed):
                q, k, v = attention.qkv(normed, cos, sin)
                if step == 0:
                    true_keys.append((k, v))
                    return attention.out(_attend(q, k, v, causal=True))
                chain_keys[layer_index].append((k, v))
                return attention.out(_chain_attend(q, true_keys[layer_index], chain_keys[layer_index], causal))

            for index, layer in enumerate(self.layers):
                x = layer(x, partial(attend, index))
            outputs.append(x)
            features = x
        stacked = torch.stack(outputs)
        return stacked, base.lm_head(stacked) if project else None

    def training_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, base: BaseHandles) -> torch.Tensor:
        return self.unroll(hidden, input_ids, base, self.positions)[1]

    def add_noise(self, hidden: torch.Tensor) -> torch.Tensor:
        """EAGLE-1's AddUniformNoise: (rand - 0.5) * std * 512 / T."""
        if self.noise_std <= 0:
            return hidden
        scale = self.noise_std * (self.noise_ref_length / hidden.shape[1] if self.noise_ref_length else 1.0)
        return hidden + (torch.rand_like(hidden) - 0.5) * scale

    def training_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                      base: BaseHandles) -> tuple[torch.Tensor, torch.Tensor]:
        """EAGLE-1's loss: v_weight * SmoothL1(f^_{t+1}, f_{t+1}) + p_weight * CE(softmax(lm_head(f_{t+1})),
        lm_head(f^_{t+1})), masked means over positions t whose predicted token x_{t+2} is an assistant token
        (loss_mask[b, t + 2]); averaged over the first `train_steps` unrolled steps (EAGLE-1: 1).
        Returns (loss, logits [K, B, T, V]): K = train_steps while training, max(train_steps,
        num_positions) in eval mode (so top-k accuracy sees every position)."""
        steps = self.train_steps if self.training else max(self.train_steps, self.positions)
        hidden = hidden.to(self.fc.weight.dtype)          # a feature cache stores fp16
        inputs = self.add_noise(hidden) if self.training else hidden
        # training projects through the 49k-row lm_head only the rows the loss reads (assistant tokens, about a
        # third of a conversation); eval needs every row's logits for the top-k accuracy
        predicted, logits = self.unroll(inputs, input_ids, base, steps, project=not self.training)
        length = hidden.shape[1]
        mask = loss_mask.to(torch.bool)
        total = hidden.new_zeros((), dtype=torch.float32)
        v_total = p_total = 0.0
        self.last_topk = {}
        for step in range(self.train_steps):
            span = length - step - 2          # origins t with x_{t+step+2} inside the sequence
            if span <= 0:
                continue
            valid = mask[:, step + 2:]                                               # [B, span]
            count = valid.sum().float() + 1e-5
            true_next = hidden[:, step + 1: step + 1 + span][valid]                  # [N, H] f_{t+step+1}
            guess = predicted[step, :, :span][valid]                                 # [N, H] its prediction
            v_loss = F.smooth_l1_loss(guess.float(), true_next.float(), reduction="none").mean(-1).sum() / count
            with torch.no_grad():
                p_target = torch.softmax(base.lm_head(true_next).float(), dim=-1)   # [N, V]
            guess_logits = base.lm_head(guess) if logits is None else logits[step, :, :span][valid]
            p_loss = -(p_target * torch.log_softmax(guess_logits.float(), dim=-1)).sum() / count
            if self.training:   # Medusa-style step metrics: x_{t+step+2} in the top-k of this step's logits
                self.last_topk.update(_step_topk(guess_logits.detach(), input_ids[:, step + 2:][valid], base, step))
            total = total + self.v_weight * v_loss + self.p_weight * p_loss
            v_total += float(v_loss.detach())
            p_total += float(p_loss.detach())
        self.last_losses = {"vloss": v_total / self.train_steps, "ploss": p_total / self.train_steps}
        return total / self.train_steps, logits


@torch.no_grad()
def _step_topk(logits: torch.Tensor, targets: torch.Tensor, base: BaseHandles, step: int, top: int = 5) -> dict:
    """{medusa{step}_top{k}: share of targets [N] in the top-k of logits [N, V]} (draft-vocabulary ids when the
    head's vocabulary is reduced)."""
    if targets.numel() == 0:
        return {}
    to_draft = getattr(base.lm_head, "to_draft_ids", None)
    targets = to_draft(targets) if to_draft is not None else targets
    hits = logits.topk(min(top, logits.shape[-1]), dim=-1).indices == targets[:, None]
    return {f"medusa{step}_top{k}": float(hits[:, :k].any(-1).float().mean()) for k in range(1, top + 1)}


def _chain_attend(q, true_kv, chain_kv, causal) -> torch.Tensor:
    """Queries of chain step j for every origin t: q [B, h, T, d] sees the true keys 0..t (causal [T, T])
    and its own chain's keys of steps 1..j (chain_kv: j entries of [B, kv_heads, T, d], row t = origin t)."""
    keys, values = true_kv
    groups = q.shape[1] // keys.shape[1]
    scale = q.shape[-1] ** -0.5
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    chain_k = torch.stack([k for k, _ in chain_kv], dim=3).repeat_interleave(groups, 1)   # [B, h, T, j, d]
    chain_v = torch.stack([v for _, v in chain_kv], dim=3).repeat_interleave(groups, 1)
    true_scores = (q @ keys.transpose(-1, -2)) * scale                                    # [B, h, T, T]
    true_scores = true_scores.masked_fill(~causal, float("-inf"))
    chain_scores = torch.einsum("bhtd,bhtjd->bhtj", q, chain_k) * scale
    weights = torch.softmax(torch.cat([true_scores, chain_scores], dim=-1).float(), dim=-1).to(q.dtype)
    length = keys.shape[2]
    return weights[..., :length] @ values + torch.einsum("bhtj,bhtjd->bhtd", weights[..., length:], chain_v)


def official_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official EAGLE keys -> EagleHead keys (the same names, less the embedding copy and rotary buffers)."""
    return {key: value for key, value in tensors.items()
            if key != "embed_tokens.weight" and not key.endswith("rotary_emb.inv_freq")}


def build_eagle_head(base_config, base: BaseHandles | None = None, **kwargs) -> EagleHead:
    """A fresh EAGLE head for a target with `base_config` (architecture copied from it unless given)."""
    return build_head("eagle", base_config, base=base, **EagleHead.kwargs_from_base(base_config, kwargs))


# ---------------------------------------------------------------------------------------------
# decoding


@dataclass
class _Expansion:
    """Nodes of this step that the head has read (each holds one speculative cache slot)."""
    slots: dict[int, int] = field(default_factory=dict)              # node -> cache index
    ancestors: dict[int, list[int]] = field(default_factory=dict)    # node -> cache indices of its path


def sample_children(logits: torch.Tensor, count: int, temperature: float, generator: torch.Generator | None
                    ) -> tuple[list[int], torch.Tensor]:
    """`count` tokens drawn without replacement from softmax(logits / T); row i of q [count, V] is the
    distribution token i was drawn from (renormalised without tokens 0..i-1)."""
    q = torch.softmax(logits.float() / temperature, dim=-1)
    tokens, rows = [], []
    for _ in range(count):
        if q.sum() > 0:
            token = categorical(q, generator)
            rows.append(q)
        else:   # the support is exhausted: propose the best undrawn token as a point mass (still exact)
            token = int(logits.float().index_fill(0, torch.tensor(tokens, device=logits.device), -math.inf).argmax())
            rows.append(torch.zeros_like(q).index_fill_(0, torch.tensor([token], device=q.device), 1.0))
        tokens.append(token)
        q = q.clone()
        q[token] = 0.0
        if q.sum() > 0:
            q = q / q.sum()
    return tokens, torch.stack(rows)


class EagleProposer(Proposer):
    """EAGLE-1 static tree or EAGLE-2 dynamic tree from an EAGLE head."""

    name = "eagle"
    head_type = "eagle"

    @classmethod
    def verify_tokens(cls, cfg) -> int:
        """Static: root + every node of tree_choices. Dynamic (EAGLE-2): total_token, root included (the reranked
        tree the target verifies), or auto_max_tokens when the size is chosen per step."""
        if cls.config_value(cfg, "tree") == "static":
            return 1 + len(index_tree(named_tree(cls.config_value(cfg, "tree_choices")))[0])
        total = cls.config_value(cfg, "total_token")
        return int(cls.config_value(cfg, "auto_max_tokens")) if total == "auto" else int(total)

    def __init__(self, head_path: str | None = None, official: bool = False, tree: str = "static",
                 tree_choices: str | list = "eagle_25", total_token: int | str = 60, depth: int = 5,
                 top_k: int = 10, sample_draft: bool = False, auto_max_tokens: int = 64,
                 latency_curve: str | dict | None = None, calibrate: bool = True, num_layers: int = 1,
                 fc_bias: bool = True, draft_dtype: str | None = None):
        if tree not in ("static", "dynamic"):
            raise HarnessError(f"method.tree={tree}: use static (EAGLE-1) or dynamic (EAGLE-2)")
        self.auto = total_token == "auto"
        if not self.auto and (not isinstance(total_token, int) or total_token < 1):
            raise HarnessError(f"method.total_token={total_token}: give the verify size (root included, >= 1) or auto")
        if depth < 0 or top_k < 1:
            raise HarnessError("method.depth must be >= 0 and method.top_k >= 1")
        if sample_draft and tree != "static":
            raise HarnessError("method.sample_draft=true is EAGLE-1's static-tree sampling; set method.tree=static")
        if self.auto and tree != "dynamic":
            raise HarnessError("method.total_token=auto sizes the EAGLE-2 dynamic tree; set method.tree=dynamic")
        self.head_path, self.official, self.tree = head_path, bool(official), tree
        self.choices = named_tree(tree_choices)
        self.total_token = None if self.auto else int(total_token)
        self.depth, self.top_k, self.sample_draft = int(depth), int(top_k), bool(sample_draft)
        self.auto_max_tokens, self.latency_curve, self.calibrate = int(auto_max_tokens), latency_curve, bool(calibrate)
        self.head_kwargs = dict(num_layers=num_layers, fc_bias=fc_bias)
        resolve_draft_dtype(draft_dtype)        # a bad name is one line here, before the target loads
        self.draft_dtype = draft_dtype

    # -- setup

    def setup(self, loaded) -> None:
        self.device, self.dtype = loaded.head_device, resolve_draft_dtype(self.draft_dtype, loaded)
        self.head = load_or_init_head(self.head_path, loaded, "eagle", official=self.official, dtype=self.dtype,
                                      **self.head_kwargs)
        self.base = BaseHandles.for_head(loaded.model, self.head, dtype=self.dtype)
        self.clock = Clock(loaded.devices)
        if self.tree == "static":
            self.parents, self.depths, self.ranks = index_tree(self.choices)
            self.max_depth = max(self.depths)
        if self.auto:
            self.sizer = make_sizer(loaded, self.latency_curve, self.auto_max_tokens, self.calibrate)

    # -- the head's view of committed positions

    def reset(self, ctx: DecodeContext) -> None:
        layers, kv_heads, head_dim = self.head.kv_shape
        self.cache = HeadCache(layers, kv_heads, head_dim, self.dtype, self.device,
                               capacity=max(512, 2 * len(ctx.tokens)))
        self.committed = 0
        self.pending: list[tuple[torch.Tensor, list[int]]] = []
        self._ingest(ctx)

    def observe(self, step: Step, ctx: DecodeContext) -> None:
        start = self.clock()
        read = self._ingest(ctx)
        if self.auto:   # a queued step read nothing: it says nothing about what a read costs
            self.sizer.observe(step.acceptance.accepted_draft, self.clock() - start if read else None)

    def _ingest(self, ctx: DecodeContext) -> bool:
        """Queue the committed pairs (f_t, x_{t+1}) of the last step; read them now unless the auto sizer is
        declining to draft (then they wait for the next step that drafts, read in one forward: a step that
        drafts nothing costs what vanilla's does; the catch-up read is timed as part of that step's drafting).
        Returns whether the pairs were read now."""
        count = ctx.hidden.shape[0]
        self.pending.append((ctx.hidden, list(ctx.tokens[-count:])))
        if self.auto and self.sizer.gain < 1.0:
            return False
        self._read_pending()
        return True

    def _read_pending(self) -> None:
        """Drop the speculative entries, read every queued committed pair in one forward of the head."""
        if not self.pending:
            return
        self.cache.crop(self.committed)
        hidden = torch.cat([h for h, _ in self.pending]) if len(self.pending) > 1 else self.pending[0][0]
        tokens = torch.tensor([t for _, ids in self.pending for t in ids], device=self.device)
        self.pending = []
        count = hidden.shape[0]
        positions = torch.arange(self.committed, self.committed + count, device=self.device)
        out = self.head.forward_cached(hidden.to(self.dtype), tokens, positions, None, self.cache, self.base)
        self.committed += count
        self.root_feature = out[-1]            # f^ for the pending token: its children's distribution

    def _expand(self, nodes: list[int], features: torch.Tensor, tokens: list[int], depth: int,
                parent_of: dict[int, int], expansion: _Expansion) -> torch.Tensor:
        """Run the head on tree nodes of one depth (their parents' f^ + their tokens) under the tree mask;
        returns their f^ [m, H]. Each node sees the committed pairs, its expanded ancestors and itself."""
        past = self.cache.length
        count = len(nodes)
        visible = torch.zeros(count, past + count, dtype=torch.bool)
        visible[:, : self.committed] = True
        for row, node in enumerate(nodes):
            parent = parent_of[node]
            path = expansion.ancestors[parent] + [expansion.slots[parent]] if parent >= 0 else []
            expansion.ancestors[node] = path
            expansion.slots[node] = past + row
            visible[row, path] = True
            visible[row, past + row] = True
        positions = torch.full((count,), self.committed - 1 + depth, device=self.device)
        token_ids = torch.tensor(tokens, device=self.device)
        return self.head.forward_cached(features, token_ids, positions, visible.to(self.device), self.cache, self.base)

    # -- drafting

    def propose(self, ctx: DecodeContext) -> Draft:
        # drafts only while a draft token can still be emitted; the tree itself is not cut to the budget
        if ctx.draft_budget(1) <= 0:
            return Draft.empty()
        self.cache.crop(self.committed)
        if self.tree == "static":
            return self._propose_static(ctx)
        return self._propose_dynamic(ctx)

    def _propose_static(self, ctx: DecodeContext) -> Draft:
        sampling = not ctx.sampling.greedy and self.sample_draft
        count = len(self.parents)
        tokens: list[int] = [0] * count
        q_rows: list[torch.Tensor | None] = [None] * count
        children: dict[int, list[int]] = {}
        for node, parent in enumerate(self.parents):
            children.setdefault(parent, []).append(node)
        features = {-1: self.root_feature}
        parent_of = dict(enumerate(self.parents))
        expansion = _Expansion()
        for depth in range(1, self.max_depth + 1):
            # the parents of this depth's nodes were read at the previous depth: choose their children
            parents = sorted({self.parents[n] for n in range(count) if self.depths[n] == depth})
            logits = self.base.lm_head(torch.stack([features[p] for p in parents]))      # [m, V]
            for row, parent in enumerate(parents):
                kids = children[parent]
                need = max(self.ranks[k] for k in kids) + 1
                if sampling:
                    drawn, q = sample_children(logits[row], need, ctx.sampling.temperature, ctx.generator)
                else:
                    drawn, q = logits[row].topk(min(need, logits.shape[-1])).indices.tolist(), None
                for kid in kids:
                    rank = min(self.ranks[kid], len(drawn) - 1)
                    tokens[kid] = drawn[rank]
                    if q is not None:
                        q_rows[kid] = q[rank]
            if depth == self.max_depth:
                break
            expand = [n for n in range(count) if self.depths[n] == depth and n in children]
            if not expand:
                break
            out = self._expand(expand, torch.stack([features[self.parents[n]] for n in expand]),
                               [tokens[n] for n in expand], depth, parent_of, expansion)
            features.update(zip(expand, out))
        q_draft = torch.stack(q_rows) if sampling else None
        return Draft(tokens, self.parents, q_draft)

    def _propose_dynamic(self, ctx: DecodeContext) -> Draft:
        if self.auto and not self.sizer.should_draft():
            return Draft.empty()       # drafting has not paid lately on this device: a plain step
        start = self.clock()
        self._read_pending()               # the pairs queued while drafting was declined (sized into the cost)
        top_k = self.top_k
        logp = torch.log_softmax(self.base.lm_head(self.root_feature).float(), dim=-1)
        top = logp.topk(top_k)
        cand_tokens = [top.indices]                                       # per depth [k] then [k * k]
        cand_scores = [top.values]                                        # cumulative log-prob
        cand_parents = [torch.full((top_k,), -1, dtype=torch.long, device=logp.device)]
        parent_of = {i: -1 for i in range(top_k)}
        beam = list(range(top_k))                                         # candidate ids to expand
        beam_features = self.root_feature.expand(top_k, -1)
        beam_tokens, beam_scores = top.indices.tolist(), top.values
        expansion = _Expansion()
        next_id = top_k
        for level in range(self.depth):
            out = self._expand(beam, beam_features, beam_tokens, level + 1, parent_of, expansion)   # [k, H]
            child_logp = torch.log_softmax(self.base.lm_head(out).float(), dim=-1)
            top = child_logp.topk(top_k, dim=-1)
            scores = (beam_scores[:, None] + top.values).flatten()                                 # [k * k]
            ids = torch.arange(next_id, next_id + top_k * top_k, device=logp.device)
            parents = torch.tensor(beam, device=logp.device).repeat_interleave(top_k)
            cand_tokens.append(top.indices.flatten())
            cand_scores.append(scores)
            cand_parents.append(parents)
            for cid, parent in zip(ids.tolist(), parents.tolist()):
                parent_of[cid] = parent
            next_id += top_k * top_k
            if level + 1 == self.depth:
                break
            best = scores.topk(top_k).indices
            beam = ids[best].tolist()
            beam_features = out[best // top_k]
            beam_tokens = top.indices.flatten()[best].tolist()
            beam_scores = scores[best]
        tokens = torch.cat(cand_tokens)
        scores = torch.cat(cand_scores)
        parents = torch.cat(cand_parents)
        # rerank: best path confidence first; ties keep the lower id (a parent before its child)
        if self.auto:
            keep = keep_most_likely(self.sizer, scores.exp(), self.clock() - start)
        else:
            keep = best_nodes(scores, self.total_token - 1)             # ascending id = topological order
        if not keep:
            return Draft.empty()
        return Draft(*subtree(tokens.tolist(), parents.tolist(), keep))
