"""Medusa (Cai et al. 2024, arXiv:2401.10774), Medusa-1: K heads on the frozen target's last hidden state.

Head i = `medusa_num_layers` residual blocks (x + SiLU(Linear(x)), the Linear weight zero-initialised
so a fresh head starts as the identity) + a vocabulary projection: its own lm_head copied from the
target's (`own_lm_head: true`, as in the paper) or the target's lm_head shared (`false`, one vocabulary
x hidden matrix less per head; docs/method_notes.md). From the state h_t (whose lm_head logits gave the pending token x_{t+1}), head i
predicts x_{t+i+2}.

Decoding: a static tree of candidates, `medusa_choices` (index paths: [0, 1] = head 0's top-1 token,
then head 1's top-2 token below it), verified in one forward by the harness loop and accepted by its
shared greedy / rejection-sampling code (lossless; the candidates are deterministic, q_draft = None).
`tree: auto` sizes the tree on the hardware at hand (harness/engine/sizing.py): `medusa_choices` becomes the
pool of candidates, each node's path confidence is the product of its heads' probabilities along its
path (the heads are independent, so this is Medusa's own estimate of the path), and every step keeps the
n most confident nodes (prefix-closed), n maximising the expected tokens per second on the measured
verify curve; while drafting pays, the next step runs the heads only one level deeper than the deepest node
kept; while it does not pay it is skipped (plain target steps), but for probes that draft the whole tree.
A published checkpoint (FasterDecoding/medusa-*, `MedusaHead.from_official`) brings as many heads as its weights hold
(5 for medusa-vicuna-7b/13b-v1.3, whatever config.json says); `medusa_num_heads` then caps how many of them
load (Spec-Bench uses 4; mc_sim_7b_63 is 4 deep, so a 5th head would never be run). A specdec-train head
brings its own shape; for a null head_path `medusa_num_heads` is the untrained head's shape.
`acceptance: typical` is Medusa's typical acceptance (harness/engine/acceptance.py): LOSSY by design,
declared to the loop through `Proposer.acceptance` and only allowed with `lossy: true` in the method
config so every report marks it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from harness.engine.acceptance import acceptance_rule
from harness.engine.loop import Clock, DecodeContext, Draft, Proposer, Step
from harness.engine.sizing import keep_most_likely, make_sizer
from harness.engine.tree import index_tree, preset_paths, subtree
from harness.heads.base import BaseHandles, DraftHead, build_head, resolve_draft_dtype
from harness.heads.checkpoint import (check_dims, check_state_dict, has_published_layout, load_or_init_head,
                                      published_weights, read_published_config, read_tensors)
from harness.infra.errors import HarnessError

log = logging.getLogger(__name__)

# FasterDecoding/Medusa medusa/model/medusa_choices.py `mc_sim_7b_63`: the tree tuned for Vicuna-7B on
# an A100 (63 nodes, depth 4, so it uses 4 heads); a GPU preset.
MC_SIM_7B_63 = [[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0],
                [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0],
                [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5],
                [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9],
                [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0],
                [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0]]

# CPU preset: on 2 cores every verify token costs ~2 ms on SmolLM2-135M (DESIGN.md: 41 ms for 1 token,
# 63 ms for 11), so a handful of nodes on the most likely paths: 2 at depth 1, the top chain to depth 3.
MC_CPU_5 = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]

PRESETS = {"mc_sim_7b_63": MC_SIM_7B_63, "mc_cpu_5": MC_CPU_5}


def named_choices(medusa_choices: str | list) -> list[list[int]]:
    """A preset name (PRESETS) or a list of index paths -> the index paths."""
    return preset_paths(medusa_choices, PRESETS, "medusa_choices")


OFFICIAL_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")


def official_heads_in(tensors: dict[str, torch.Tensor]) -> int:
    """How many heads published weights hold: the distinct `{h}.` indices (the config.json count can be wrong)."""
    return len({key.split(".", 1)[0] for key in tensors if key.split(".", 1)[0].isdigit()})


def official_state_dict(tensors: dict[str, torch.Tensor], num_heads: int, num_layers: int) -> dict[str, torch.Tensor]:
    """Official `medusa_lm_head` keys ({h}.{l}.linear.weight/bias, {h}.{L}.weight) -> MedusaHead keys
    (`medusa_head.` + the same), checking that every head has its blocks and its own lm_head and that no key
    is left unexplained (the official loader's strict=False would skip both silently)."""
    names = {h: [f"{h}.{l}.linear.{part}" for l in range(num_layers) for part in ("weight", "bias")]
             + [f"{h}.{num_layers}.weight"] for h in range(num_heads)}
    for head_names in names.values():
        for name in head_names:
            if name not in tensors:
                raise HarnessError(f"the Medusa checkpoint lacks {name} (its weights hold {num_heads} heads, its "
                                   f"config.json says {num_layers} layer(s) each); re-download it or fix config.json")
    extra = sorted(set(tensors) - {name for head_names in names.values() for name in head_names})
    if extra:
        raise HarnessError(f"the Medusa checkpoint has keys its layout does not explain ({extra[:3]}); is it a "
                           f"Medusa-1 head with medusa_num_layers={num_layers} as its config.json says?")
    return {f"medusa_head.{name}": tensors[name] for head_names in names.values() for name in head_names}


class ResBlock(nn.Module):
    """x + SiLU(Linear(x)); the weight starts at zero (Medusa), the bias keeps nn.Linear's init."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHead(DraftHead):
    """K Medusa heads. Parameter names follow the official checkpoints (`medusa_head.{i}.{j}.linear.*`,
    own lm_head = `medusa_head.{i}.{num_layers}.weight`)."""

    head_type = "medusa"

    def __init__(self, hidden_size: int, vocab_size: int, medusa_num_heads: int = 1, medusa_num_layers: int = 1,
                 own_lm_head: bool = False):
        super().__init__(dict(hidden_size=hidden_size, vocab_size=vocab_size, medusa_num_heads=medusa_num_heads,
                              medusa_num_layers=medusa_num_layers, own_lm_head=own_lm_head))
        if medusa_num_heads < 1 or medusa_num_layers < 0:
            raise HarnessError("a Medusa head needs medusa_num_heads >= 1 and medusa_num_layers >= 0")
        self.own_lm_head = bool(own_lm_head)
        self.medusa_head = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden_size) for _ in range(medusa_num_layers)],
                          *([nn.Linear(hidden_size, vocab_size, bias=False)] if own_lm_head else []))
            for _ in range(medusa_num_heads))
        self.num_layers = medusa_num_layers

    # -- the published checkpoint layout (FasterDecoding/medusa-vicuna-7b-v1.3, ...): `config.json`
    # {medusa_num_heads, medusa_num_layers, base_model_name_or_path} + `medusa_lm_head.pt` (or .safetensors) =
    # `medusa_head.state_dict()` of nn.ModuleList(Sequential(ResBlock * L, Linear(H, V, bias=False)) * K):
    #     {h}.{l}.linear.weight / .bias    residual block l of head h
    #     {h}.{L}.weight                   head h's own lm_head
    # which is this class with own_lm_head=True and the `medusa_head.` prefix. K is counted from the weights,
    # not config.json: medusa-vicuna-7b/13b-v1.3 say `medusa_num_heads: 2` but hold 5 heads (keys `0.*` ..
    # `4.*`, lmdeploy issue #1180), and the official MedusaModel.from_pretrained forces 5 and loads
    # non-strictly; Spec-Bench builds 4. We load every head the weights hold, or the first `max_heads` (the
    # method's medusa_num_heads), and, unlike strict=False, refuse a key the layout does not explain or a
    # missing / misshapen tensor.

    @classmethod
    def is_published(cls, folder) -> bool:
        return has_published_layout(folder, OFFICIAL_WEIGHTS)

    @classmethod
    def from_official(cls, folder, loaded, max_heads: int | None = None) -> "MedusaHead":
        """A published Medusa-1 head folder -> MedusaHead(own_lm_head=True) on loaded's device and dtype, with every
        head the weights hold (as the official loader), or the first `max_heads` (method.medusa_num_heads)."""
        folder = Path(folder)
        config = read_published_config(folder)
        tensors = read_tensors(published_weights(folder, OFFICIAL_WEIGHTS, "Medusa"))
        tensors = {key.removeprefix("medusa_head."): value for key, value in tensors.items()}
        try:
            num_layers = int(config["medusa_num_layers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HarnessError(f"{folder}/config.json lacks medusa_num_layers (a Medusa config.json has "
                               f"medusa_num_heads and medusa_num_layers); is it a Medusa head?") from exc
        stored = official_heads_in(tensors)
        if stored == 0:
            raise HarnessError(f"{folder} holds no Medusa head weights ({{h}}.{{l}}.linear.weight ...); is it a "
                               f"Medusa-1 head?")
        said = config.get("medusa_num_heads")
        if said is not None and said != stored:
            log.info("%s: config.json says %s heads, the weights hold %d: using %d, as the official loader does",
                     folder, said, stored, stored)
        used = stored if max_heads is None else min(stored, int(max_heads))
        if used < 1:
            raise HarnessError(f"method.medusa_num_heads={max_heads}: use at least 1 of the {stored} heads in {folder}")
        if used < stored:
            log.info("%s: using the first %d of its %d heads (method.medusa_num_heads=%s)", folder, used, stored,
                     max_heads)
        lm_head = tensors.get(f"0.{num_layers}.weight")
        if lm_head is not None and lm_head.dim() == 2:
            check_dims({"vocab_size": lm_head.shape[0], "hidden_size": lm_head.shape[1]}, loaded, folder, "Medusa")
        base = config.get("base_model_name_or_path")
        if base:
            log.info("published Medusa head %s was trained for %s", folder, base)
        state = official_state_dict(tensors, stored, num_layers)
        head = build_head("medusa", loaded.model.config, medusa_num_heads=used, medusa_num_layers=num_layers,
                          own_lm_head=True)
        expected = head.state_dict()
        for key, value in state.items():       # every stored head, used or not, has head 0's shapes in our class
            need = tuple(expected["medusa_head.0." + key.split(".", 2)[2]].shape)
            if tuple(value.shape) != need:
                raise HarnessError(f"{folder}: {key} has shape {tuple(value.shape)}, this target needs {need}; pick "
                                   f"the head published for this model")
        state = {key: value for key, value in state.items() if int(key.split(".")[1]) < used}
        check_state_dict(expected, state, str(folder), "Medusa layout", "pick the head published for this model")
        head.load_state_dict(state)
        return head.to(device=loaded.head_device, dtype=loaded.dtype).eval().requires_grad_(False)

    @property
    def num_positions(self) -> int:
        return len(self.medusa_head)

    def init_from_base(self, base: BaseHandles) -> None:
        if self.own_lm_head:
            with torch.no_grad():
                for head in self.medusa_head:
                    head[self.num_layers].weight.copy_(base.lm_head.weight)

    def logits(self, hidden: torch.Tensor, base: BaseHandles, num_heads: int | None = None) -> torch.Tensor:
        """hidden [..., H] -> [K, ..., V] for the first num_heads heads (all by default).
        A shared lm_head projects all K states in one matmul (the projection dominates on a CPU)."""
        states = []
        for head in self.medusa_head[: num_heads or len(self.medusa_head)]:
            x = hidden
            for j in range(self.num_layers):
                x = head[j](x)
            states.append(head[self.num_layers](x) if self.own_lm_head else x)
        stacked = torch.stack(states)
        return stacked if self.own_lm_head else base.lm_head(stacked)

    def training_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, base: BaseHandles) -> torch.Tensor:
        return self.logits(hidden, base)   # Medusa-1 reads only h_t: no token inputs to teacher-force


# ---------------------------------------------------------------------------------------------
# decoding


class MedusaProposer(Proposer):
    """Medusa-1 tree drafting from the heads' top-k at ctx.hidden[-1]; static, or sized per step (tree: auto).
    A node at depth d (harness.engine.tree.index_tree) is head d-1's rank-r token."""

    name = "medusa"
    head_type = "medusa"

    @classmethod
    def verify_tokens(cls, cfg) -> int:
        """Root + every node of medusa_choices (tree: auto keeps at most these)."""
        return 1 + len(index_tree(named_choices(cls.config_value(cfg, "medusa_choices")), option="medusa_choices")[0])

    def __init__(self, head_path: str | None = None, medusa_choices: str | list = "mc_cpu_5", tree: str = "static",
                 auto_max_tokens: int = 16, latency_curve: str | dict | None = None, calibrate: bool = True,
                 medusa_num_heads: int = 3, medusa_num_layers: int = 1, own_lm_head: bool = False,
                 acceptance: str = "lossless", posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                 lossy: bool = False, draft_dtype: str | None = None):
        if tree not in ("static", "auto"):
            raise HarnessError(f"method.tree={tree}: use static (verify every node of medusa_choices) or auto "
                               f"(keep the nodes that pay on this device, per step)")
        acceptance_rule(acceptance, bool(lossy), "medusa")   # the lossy flag must match the rule, before any load
        self.choices = named_choices(medusa_choices)
        self.auto = tree == "auto"
        self.auto_max_tokens, self.latency_curve, self.calibrate = int(auto_max_tokens), latency_curve, bool(calibrate)
        self.head_path = head_path
        self.head_kwargs = dict(medusa_num_heads=medusa_num_heads, medusa_num_layers=medusa_num_layers,
                                own_lm_head=own_lm_head)
        self.acceptance = acceptance
        self.posterior_threshold, self.posterior_alpha = posterior_threshold, posterior_alpha
        self.lossy = bool(lossy)
        resolve_draft_dtype(draft_dtype)        # a bad name is one line here, before the target loads
        self.draft_dtype = draft_dtype

    def setup(self, loaded) -> None:
        # a published checkpoint: medusa_num_heads caps the heads its weights hold
        self.dtype = resolve_draft_dtype(self.draft_dtype, loaded)
        self.head = load_or_init_head(self.head_path, loaded, "medusa",
                                      official_options={"max_heads": self.head_kwargs["medusa_num_heads"]},
                                      dtype=self.dtype, **self.head_kwargs)
        self.base = BaseHandles.for_head(loaded.model, self.head, dtype=self.dtype)
        depth = max(len(path) for path in self.choices)
        if depth > self.head.num_positions:
            log.info("medusa: the tree is %d deep but the head has %d positions; deeper nodes are dropped",
                     depth, self.head.num_positions)
        self.parents, depths, ranks = index_tree(self.choices, self.head.num_positions, option="medusa_choices")
        heads = [depth - 1 for depth in depths]
        if not self.parents:
            raise HarnessError("medusa_choices leaves no node for this head; give at least one path like [0]")
        device = loaded.head_device
        self.node_head = torch.tensor(heads, device=device)     # [n] which head drafts each node
        self.node_rank = torch.tensor(ranks, device=device)     # [n] its rank in that head's top-k
        self.top_k = max(ranks) + 1
        self.used_heads = max(heads) + 1
        # nodes come sorted by depth, so "depth <= d" is a prefix: its length for each d (near a turn's end)
        self.nodes_within = [sum(1 for h in heads if h < d) for d in range(self.used_heads + 1)]
        self.depth_limit = self.used_heads      # auto: heads to run while drafting pays
        if self.auto:
            self.clock = Clock(device)
            self.sizer = make_sizer(loaded, self.latency_curve, self.auto_max_tokens, self.calibrate)

    @property
    def acceptance_options(self) -> dict[str, float]:
        if self.acceptance != "typical":
            return {}
        return {"posterior_threshold": self.posterior_threshold, "posterior_alpha": self.posterior_alpha}

    def propose(self, ctx: DecodeContext) -> Draft:
        # auto, while drafting pays: one head deeper than the deepest node kept last; a probe runs every head
        limit = self.depth_limit if self.auto and self.sizer.gain >= 1.0 else self.used_heads
        heads = ctx.draft_budget(limit)                                        # no node past the token cap
        if heads <= 0:
            return Draft.empty()
        if self.auto and not self.sizer.should_draft():
            return Draft.empty()     # drafting has not paid lately on this device: a plain target step
        start = self.clock() if self.auto else 0.0
        count = self.nodes_within[heads]
        # ctx.hidden[-1] = h_t, the state whose logits chose the pending token x_{t+1}; head i -> x_{t+i+2}
        logits = self.head.logits(ctx.hidden[-1].to(self.dtype), self.base, heads)   # [K', V]
        node_head, node_rank = self.node_head[:count], self.node_rank[:count]
        if self.auto:
            top = torch.softmax(logits.float(), dim=-1).topk(self.top_k, dim=-1)   # [K', top_k]
            tokens = top.indices[node_head, node_rank].tolist()
            path_probs: list[float] = []
            for prob, parent in zip(top.values[node_head, node_rank].tolist(), self.parents):
                path_probs.append(prob * (path_probs[parent] if parent >= 0 else 1.0))
            keep = keep_most_likely(self.sizer, torch.tensor(path_probs, dtype=torch.float64), self.clock() - start)
            deepest = max((int(self.node_head[i]) + 1 for i in keep), default=0)
            self.depth_limit = min(self.used_heads, deepest + 1)
            if not keep:
                return Draft.empty()
            return Draft(*subtree(tokens, self.parents, keep))
        ranked = logits.topk(self.top_k, dim=-1).indices                        # [K', top_k]
        tokens = ranked[node_head, node_rank].tolist()
        return Draft(tokens, self.parents[:count])       # deterministic candidates: q_draft None

    def observe(self, step: Step, ctx: DecodeContext) -> None:
        if self.auto:
            self.sizer.observe(step.acceptance.accepted_draft, 0.0)   # nothing to read back: Medusa keeps no state
