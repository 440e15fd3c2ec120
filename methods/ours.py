"""Ours: one light recurrent head that drafts several tokens from the target's last hidden state fused
with the embeddings of the last three tokens (the trigram).

Step k (k = 0 .. K-1) predicts x_{t+k+2}:
    s_k = blocks(W [s_{k-1} ; e(x_{t+k-1}) ; e(x_{t+k}) ; e(x_{t+k+1})])      s_{-1} = h_t (target state)
    logits_k = lm_head(s_k)                                                     frozen base lm_head by default
At k = 0 the trigram ends with the pending token x_{t+1}, which h_t has not seen: that is the signal a
Medusa head lacks. Each drafted token then shifts the trigram and s_k replaces h for the next step.
`trigram: false` is the ablation: s_k = blocks(W s_{k-1}), the same recurrence without token inputs.
The fusion starts as [I 0 0 0] and the blocks as identities, so an untrained head drafts what the
target's own lm_head says about h (not random tokens).

Drafting: `chain` (argmax each step), `beam` (beam search of width `beam_width` over `top_k`
expansions per beam; the draft is the tree of every prefix the beam kept) or `tree` (every beam's
`top_k` children enter the draft, the `beam_width` best by cumulative log-prob are expanded);
`max_nodes` keeps the best nodes by cumulative log-prob (a prefix-closed cut: a path's log-prob only
falls). Candidates are deterministic (q_draft = None), so greedy and sampling stay lossless.
`max_nodes: auto` sizes every step's draft on the hardware at hand (harness/engine/sizing.py): a node's path
confidence is the product of the head's probabilities along its path, and the n most confident nodes are
kept (a chain: its first n tokens), n maximising the expected tokens per second on the measured verify
curve. While drafting pays, the next step drafts at most one level past the deepest node kept; while it
does not pay it is skipped (plain target steps), but for probes that draft to the full depth.

The vocabulary projection dominates a draft step (docs/method_notes.md), so a beam's projections go
through one matmul per depth.
"""

from __future__ import annotations

import torch
from torch import nn

from baselines.medusa import ResBlock
from harness.engine.loop import Clock, DecodeContext, Draft, Proposer, Step
from harness.engine.sizing import keep_most_likely, make_sizer
from harness.engine.tree import best_nodes, depths_of, subtree
from harness.heads.base import BaseHandles, DraftHead, resolve_draft_dtype
from harness.heads.checkpoint import load_or_init_head
from harness.infra.errors import HarnessError

DRAFT_MODES = ("chain", "beam", "tree")


class OursHead(DraftHead):
    head_type = "ours"

    def __init__(self, hidden_size: int, vocab_size: int, num_positions: int = 4, num_layers: int = 1,
                 trigram: bool = True, own_lm_head: bool = False):
        super().__init__(dict(hidden_size=hidden_size, vocab_size=vocab_size, num_positions=num_positions,
                              num_layers=num_layers, trigram=trigram, own_lm_head=own_lm_head))
        if num_positions < 1 or num_layers < 0:
            raise HarnessError("a trigram head needs num_positions >= 1 and num_layers >= 0")
        self.trigram, self.own_lm_head, self.positions = bool(trigram), bool(own_lm_head), int(num_positions)
        inputs = 4 if self.trigram else 1
        self.fuse = nn.Linear(inputs * hidden_size, hidden_size)
        with torch.no_grad():   # start as "s = h": the head begins where the target's own lm_head is
            self.fuse.weight.zero_()
            self.fuse.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
            self.fuse.bias.zero_()
        self.blocks = nn.ModuleList(ResBlock(hidden_size) for _ in range(num_layers))
        with torch.no_grad():   # unlike Medusa's blocks (bias left random), exact identities at init
            for block in self.blocks:
                block.linear.bias.zero_()
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False) if self.own_lm_head else None

    @property
    def num_positions(self) -> int:
        return self.positions

    def init_from_base(self, base: BaseHandles) -> None:
        if self.lm_head is not None:
            with torch.no_grad():
                self.lm_head.weight.copy_(base.lm_head.weight)

    def step(self, state: torch.Tensor, trigram: torch.Tensor | None) -> torch.Tensor:
        """state [..., H], trigram [..., 3H] (embeddings of the last three tokens, oldest first) -> [..., H]."""
        x = self.fuse(torch.cat([state, trigram], dim=-1) if self.trigram else state)
        for block in self.blocks:
            x = block(x)
        return x

    def project(self, state: torch.Tensor, base: BaseHandles) -> torch.Tensor:
        return (self.lm_head or base.lm_head)(state)

    def training_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, base: BaseHandles) -> torch.Tensor:
        """Teacher-forced unroll: step k at t reads the true x_{t+k-1}, x_{t+k}, x_{t+k+1} (zeros off the
        ends; those rows' targets fall outside the sequence or are zero-padded the same way at decode)."""
        batch, length, hidden_size = hidden.shape
        embeds = base.embed(input_ids).to(hidden.dtype)                          # [B, T, H]
        pad_front = embeds.new_zeros(batch, 1, hidden_size)                      # x_{-1}
        pad_back = embeds.new_zeros(batch, self.positions + 1, hidden_size)
        padded = torch.cat([pad_front, embeds, pad_back], dim=1)                 # padded[:, j] = e(x_{j-1})
        state, logits = hidden, []
        for k in range(self.positions):
            trigram = None
            if self.trigram:
                trigram = torch.cat([padded[:, k + i: k + i + length] for i in range(3)], dim=-1)
            state = self.step(state, trigram)
            logits.append(self.project(state, base))
        return torch.stack(logits)                                               # [K, B, T, V]


class OursProposer(Proposer):
    """Drafts with a OursHead: chain, beam or tree (see the module docstring)."""

    name = "ours"
    head_type = "ours"

    @classmethod
    def verify_tokens(cls, cfg) -> int:
        """Root + max_nodes where set (auto: auto_max_tokens, which counts the root), else the depth (the
        config's, or num_positions) x beam_width x top_k candidates per depth for beam and tree drafts."""
        max_nodes = cls.config_value(cfg, "max_nodes")
        if max_nodes == "auto":
            return int(cls.config_value(cfg, "auto_max_tokens"))
        if max_nodes:
            return 1 + int(max_nodes)
        depth = int(cls.config_value(cfg, "depth") or cls.config_value(cfg, "num_positions"))
        if cls.config_value(cfg, "draft") in ("beam", "tree"):
            return 1 + depth * int(cls.config_value(cfg, "beam_width")) * int(cls.config_value(cfg, "top_k"))
        return 1 + depth

    def __init__(self, head_path: str | None = None, draft: str = "chain", depth: int | None = None,
                 beam_width: int = 2, top_k: int = 2, max_nodes: int | str | None = None, auto_max_tokens: int = 16,
                 latency_curve: str | dict | None = None, calibrate: bool = True,
                 num_positions: int = 4, num_layers: int = 1, trigram: bool = True, own_lm_head: bool = False,
                 draft_dtype: str | None = None):
        if draft not in DRAFT_MODES:
            raise HarnessError(f"method.draft={draft}: use one of {', '.join(DRAFT_MODES)}")
        self.auto = max_nodes == "auto"
        if isinstance(max_nodes, str) and not self.auto:
            raise HarnessError(f"method.max_nodes={max_nodes}: give a node count, null (all) or auto (sized per step)")
        if beam_width < 1 or top_k < 1 or (depth is not None and depth < 1) or (
                max_nodes is not None and not self.auto and max_nodes < 1):
            raise HarnessError("method.beam_width, method.top_k, method.depth and method.max_nodes must be >= 1")
        self.head_path, self.mode, self.depth_cfg = head_path, draft, depth
        self.beam_width, self.top_k = beam_width, top_k
        self.max_nodes = None if self.auto else max_nodes
        self.auto_max_tokens, self.latency_curve, self.calibrate = int(auto_max_tokens), latency_curve, bool(calibrate)
        if draft == "chain":
            self.beam_width = self.top_k = 1
        self.head_kwargs = dict(num_positions=num_positions, num_layers=num_layers, trigram=trigram,
                                own_lm_head=own_lm_head)
        resolve_draft_dtype(draft_dtype)        # a bad name is one line here, before the target loads
        self.draft_dtype = draft_dtype

    def setup(self, loaded) -> None:
        self.dtype = resolve_draft_dtype(self.draft_dtype, loaded)
        self.head = load_or_init_head(self.head_path, loaded, "ours", dtype=self.dtype, **self.head_kwargs)
        if self.head.trigram != bool(self.head_kwargs["trigram"]):
            raise HarnessError(f"head {self.head_path} was trained with trigram={self.head.trigram} but the method "
                               f"says trigram={self.head_kwargs['trigram']}; use "
                               f"method={'ours' if self.head.trigram else 'ours_no_trigram'}")
        self.base = BaseHandles.for_head(loaded.model, self.head, dtype=self.dtype)
        self.device = loaded.head_device
        self.depth_limit = 1 << 30              # auto, while drafting pays: one level past the deepest node kept
        if self.auto:
            self.clock = Clock(loaded.devices)
            self.sizer = make_sizer(loaded, self.latency_curve, self.auto_max_tokens, self.calibrate)

    @property
    def depth(self) -> int:
        """Draft steps per verify: the config's `depth`, else the positions the head was trained for."""
        return self.depth_cfg or self.head.num_positions

    def _embed(self, token_ids: list[int]) -> torch.Tensor:
        return self.base.embed(torch.tensor(token_ids, device=self.device))

    def propose(self, ctx: DecodeContext) -> Draft:
        depth = ctx.draft_budget(self.depth)
        if depth <= 0:
            return Draft.empty()
        start = 0.0
        if self.auto:
            if not self.sizer.should_draft():
                return Draft.empty()     # drafting has not paid lately on this device: a plain target step
            if self.sizer.gain >= 1.0:   # drafting pays: one level past the deepest node kept (a probe: all)
                depth = min(depth, self.depth_limit)
            start = self.clock()
        head = self.head
        state = ctx.hidden[-1:].to(self.dtype)                                   # [1, H] h_t
        trigram = None
        if head.trigram:
            last = ctx.tokens[-3:]                                               # x_{t-1}, x_t, x_{t+1}
            embeds = self._embed(last).to(state.dtype)                           # [<=3, H]
            if len(last) < 3:
                embeds = torch.cat([embeds.new_zeros(3 - len(last), embeds.shape[-1]), embeds])
            trigram = embeds.reshape(1, -1)                                      # [1, 3H]
        if self.mode == "chain":
            tokens, scores = self._chain(state, trigram, depth)
            parents = tuple(range(-1, len(tokens) - 1))
        else:
            tokens, parents, scores = self._beam(state, trigram, depth)
        if self.auto:
            keep = keep_most_likely(self.sizer, torch.tensor(scores, dtype=torch.float64).exp(), self.clock() - start)
            tokens, parents = subtree(tokens, parents, keep)
            self.depth_limit = max(depths_of(parents), default=0) + 1
        elif self.max_nodes is not None and len(tokens) > self.max_nodes:
            tokens, parents = subtree(tokens, parents, best_nodes(scores, self.max_nodes))
        return Draft(tokens, parents)

    def observe(self, step: Step, ctx: DecodeContext) -> None:
        if self.auto:
            self.sizer.observe(step.acceptance.accepted_draft, 0.0)   # the head keeps no state to read back

    def _chain(self, state: torch.Tensor, trigram: torch.Tensor | None, depth: int
               ) -> tuple[list[int], list[float]]:
        """The argmax chain, and (auto only) each token's cumulative log-prob under the head."""
        tokens, scores, total = [], [], 0.0
        for _ in range(depth):
            state = self.head.step(state, trigram)
            logits = self.head.project(state, self.base)[0]
            token = int(logits.argmax())
            tokens.append(token)
            if self.auto:   # clamp: a rounding-positive log-prob would let a child outscore its parent
                total += min(0.0, float(torch.log_softmax(logits.float(), dim=-1)[token]))
                scores.append(total)
            if trigram is not None:
                trigram = torch.cat([trigram[:, state.shape[-1]:], self._embed([token]).to(state.dtype)], dim=-1)
        return tokens, scores

    def _beam(self, states: torch.Tensor, trigrams: torch.Tensor | None, depth: int
              ) -> tuple[list[int], tuple[int, ...], list[float]]:
        hidden_size = states.shape[-1]
        beam_nodes = [-1]                                                        # draft index of each beam
        beam_scores = torch.zeros(1, device=states.device)                      # [b] cumulative log-prob
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        for _ in range(depth):
            states = self.head.step(states, trigrams)                            # [b, H]
            log_probs = torch.log_softmax(self.head.project(states, self.base).float(), dim=-1)  # [b, V] one matmul
            top = log_probs.topk(self.top_k, dim=-1)                             # [b, top_k]
            # clamp: a rounding-positive log-prob would let a child outscore its parent (see tree.best_nodes)
            cumulative = (beam_scores[:, None] + top.values.clamp(max=0.0)).flatten()   # [b * top_k]
            keep = cumulative.topk(min(self.beam_width, cumulative.numel())).indices
            candidate_tokens = top.indices.flatten().tolist()
            cumulative_list = cumulative.tolist()
            if self.mode == "tree":     # every candidate is a draft node; only the best are expanded
                first = len(tokens)
                for c, token in enumerate(candidate_tokens):
                    tokens.append(token)
                    parents.append(beam_nodes[c // self.top_k])
                    scores.append(cumulative_list[c])
                new_nodes = [first + int(c) for c in keep.tolist()]
            else:                       # beam: only the kept prefixes enter the draft
                new_nodes = []
                for c in keep.tolist():
                    new_nodes.append(len(tokens))
                    tokens.append(candidate_tokens[c])
                    parents.append(beam_nodes[c // self.top_k])
                    scores.append(cumulative_list[c])
            source = keep // self.top_k                                          # [b'] beam each came from
            beam_nodes = new_nodes
            beam_scores = cumulative[keep]
            states = states[source]
            if trigrams is not None:
                kept_tokens = top.indices.flatten()[keep]
                trigrams = torch.cat([trigrams[source, hidden_size:],
                                      self.base.embed(kept_tokens).to(states.dtype)], dim=-1)
        return tokens, tuple(parents), scores
