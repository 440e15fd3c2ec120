"""The one draft -> verify loop. The harness owns the loop, the clock and the counters; a method
only proposes (see shared DESIGN.md, "The one loop").

    state = target.prefill(prompt)
    while not done:
        draft  = proposer.propose(ctx)
        scores = target.verify(draft)          # one forward, tree attention over the KV cache
        step   = accept(draft, scores)         # greedy longest match or rejection sampling
        target.commit(step.path)               # KV compaction to the accepted path
        proposer.observe(step, ctx)
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from harness.engine.acceptance import Acceptance, Sampling, acceptance_rule, select_token
from harness.infra.errors import HarnessError
from harness.engine.target import Scores, Target
from harness.engine.tree import children_of, depths_of


@dataclass
class Draft:
    tokens: list[int]                              # [n] draft token ids
    parents: tuple[int, ...]                       # [n] parent draft index, -1 = root (pending token)
    q_draft: torch.Tensor | None = None            # [n, vocab] distribution each token was drawn from
    extra_tokens: list[int] | None = None          # [m] non-draft tokens riding in the same forward
    extra_mask: torch.Tensor | None = None         # [m, 1 + n + m] bool: what each extra row sees
    extra_offsets: torch.Tensor | None = None      # [m] position of each extra token relative to root

    @staticmethod
    def empty() -> "Draft":
        return Draft([], ())

    @staticmethod
    def chain(tokens: list[int], q_draft: torch.Tensor | None = None) -> "Draft":
        return Draft(list(tokens), tuple(range(-1, len(tokens) - 1)), q_draft)


@dataclass
class DecodeContext:
    """Everything a proposer may read. The pending token is tokens[-1]; it is not in the KV cache yet."""
    tokens: list[int]              # prompt + generated ids so far
    prompt_len: int
    target: Target                 # model, KV cache (target.cache), device
    hidden: torch.Tensor           # [k, hidden] target states of the positions committed last
                                   # (after prefill: the whole prompt); hidden[-1] produced tokens[-1]
    logits: torch.Tensor           # [vocab] the target logits that produced tokens[-1]
    remaining: int                 # new tokens still allowed
    sampling: Sampling
    generator: torch.Generator | None = None
    scores: Scores | None = None   # the last verify forward (all positions, extras included)

    def draft_budget(self, k: int) -> int:
        """Draft tokens worth proposing along one path when the method wants k: a step emits at most the
        accepted draft + the target's own (bonus) token, so past remaining - 1 a draft token can never be
        emitted and only costs verify time. <= 0: propose an empty draft."""
        return min(k, self.remaining - 1)


@dataclass
class Step:
    draft: Draft
    acceptance: Acceptance
    tokens: list[int]              # tokens emitted this step (accepted + bonus, cut at a stop)


class Proposer:
    """Base class: the vanilla (empty) proposer. Methods override what they need.

    A method also describes itself to the planner (harness/plan.py) before anything loads: `verify_tokens`
    (the largest verify forward its config asks for) and `head_type` (the trained draft head it runs, if any);
    and to the loop: `acceptance`, the rule in harness/engine/acceptance.py that accepts its drafts.
    """

    name = "vanilla"
    head_type: str | None = None   # harness.heads registry name of the head it drafts with (None: no head)
    acceptance = "lossless"        # harness.engine.acceptance.RULES; a lossy rule needs `lossy: true`
    lossy = False                  # the method config's `lossy:` flag (reports mark lossy runs)

    @property
    def acceptance_options(self) -> Mapping[str, object]:
        """Keyword arguments of the acceptance rule (Medusa's typical thresholds); none by default."""
        return {}

    @classmethod
    def config_value(cls, cfg, key: str):
        """cfg[key] where the method config sets it, else the constructor's default for it (None if none)."""
        if key in cfg:
            return cfg[key]
        parameter = inspect.signature(cls.__init__).parameters.get(key)
        return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    @classmethod
    def verify_tokens(cls, cfg) -> int:
        """Tokens in one verify forward (root + draft + extras) for method config `cfg`, at its largest
        setting. The default: the pending token alone (an empty draft)."""
        return 1

    def setup(self, loaded) -> None:
        """Once per run, after the target loads (load heads, check they fit this model)."""

    def reset(self, ctx: DecodeContext) -> None:
        """Start of each turn, right after prefill."""

    def propose(self, ctx: DecodeContext) -> Draft:
        return Draft.empty()

    def observe(self, step: Step, ctx: DecodeContext) -> None:
        """After the target committed the accepted path; ctx is already updated."""


class DraftLength:
    """Chain length k, optionally adapted by transformers' assisted-decoding "heuristic" schedule:
    +2 after a step whose whole draft was accepted, -1 after any rejection, within [k_min, k_max]."""

    def __init__(self, method: str, k: int, adaptive: bool, k_min: int, k_max: int):
        if k < 1 or k_min < 1 or k_max < k_min:
            raise HarnessError(f"{method}: need 1 <= k_min <= k_max and k >= 1 (got k={k}, k_min={k_min}, k_max={k_max})")
        self.start, self.adaptive, self.k_min, self.k_max = int(k), bool(adaptive), int(k_min), int(k_max)
        self.k = self.start

    def reset(self) -> None:
        self.k = self.start        # per turn, so a resumed run repeats itself

    def update(self, step: Step) -> None:
        if not self.adaptive or not step.draft.tokens:
            return
        if step.acceptance.accepted_draft == len(step.draft.tokens):
            self.k = min(self.k + 2, self.k_max)
        else:
            self.k = max(self.k - 1, self.k_min)


@dataclass
class StopCriteria:
    token_ids: frozenset[int]
    strings: tuple[str, ...] = ()
    tokenizer: object = None
    max_new_tokens: int = 256
    cap_reason: str = "max_new_tokens"   # "context" when the cap is the model's context (bench `context.limit`)

    def cut(self, generated: list[int], new: list[int]) -> tuple[list[int], str | None]:
        """Append `new` to `generated` one by one; stop at a stop token (kept), a stop string or the cap."""
        kept = []
        for token in new:
            kept.append(token)
            total = len(generated) + len(kept)
            if token in self.token_ids:
                return kept, "eos"
            if self.strings:
                tail = self.tokenizer.decode((generated + kept)[-16:])
                if any(s in tail for s in self.strings):
                    return kept, "stop_string"
            if total >= self.max_new_tokens:
                return kept, self.cap_reason
        return kept, None


@dataclass
class TurnResult:
    token_ids: list[int]
    prompt_tokens: int
    wall_time: float                    # prefill + decode, seconds
    prefill_time: float | None          # stage times; None where a peer runner cannot split them
    draft_time: float | None
    verify_time: float | None
    bookkeeping_time: float | None
    accepted_lengths: list[int]         # per verify step (prefill counts as one step of length 1)
    draft_sizes: list[int] | None       # draft tokens proposed per step (None: not observable)
    pos_attempted: list[int] = field(default_factory=list)   # [k] steps where draft position k+1 was tried
    pos_accepted: list[int] = field(default_factory=list)    # [k] ... and accepted
    stop_reason: str = "max_new_tokens"

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def steps(self) -> int:
        return len(self.accepted_lengths)


class Clock:
    """perf_counter, synchronised on CUDA so a timer never reads queued work as done. `device` is one device or
    the devices a model's weights live on (Target.devices): a model spread by model.device_map queues work on
    each of its GPUs, and only those are waited for (never a GPU the run does not use)."""

    def __init__(self, device):
        devices = [device] if isinstance(device, (torch.device, str)) else list(device)
        self.gpus = list(dict.fromkeys(torch.device(d).index for d in devices if torch.device(d).type == "cuda"))

    def __call__(self) -> float:
        for index in self.gpus:
            torch.cuda.synchronize(index)      # index None: the current device
        return time.perf_counter()


def _position_counts(draft: Draft, acceptance: Acceptance, attempted: list[int], accepted: list[int]) -> None:
    """Acceptance per position k: tried when the node reached at depth k-1 has children in the draft."""
    if not draft.tokens:
        return
    children = children_of(draft.parents)
    depth_count = max(depths_of(draft.parents))
    while len(attempted) < depth_count:
        attempted.append(0)
        accepted.append(0)
    for k, node in enumerate(acceptance.path):
        if not children[node]:
            break
        attempted[k] += 1
        if k + 1 < len(acceptance.path):
            accepted[k] += 1


@torch.inference_mode()
def decode_turn(target: Target, proposer: Proposer, prompt_ids: list[int], sampling: Sampling,
                stop: StopCriteria, generator: torch.Generator | None = None) -> TurnResult:
    clock = Clock(target.devices)
    draft_time = verify_time = bookkeeping_time = 0.0
    start = clock()
    hidden, logits = target.prefill(prompt_ids)
    first = select_token(logits, sampling, generator)
    generated, reason = stop.cut([], [first])
    prefill_time = clock() - start
    accepted_lengths, draft_sizes, attempted, accepted = [1], [0], [], []
    ctx = DecodeContext(list(prompt_ids) + generated, len(prompt_ids), target, hidden, logits,
                        stop.max_new_tokens - len(generated), sampling, generator)
    rule = acceptance_rule(proposer.acceptance, proposer.lossy, proposer.name)
    options = proposer.acceptance_options
    if reason is None:
        t0 = clock()
        proposer.reset(ctx)
        draft_time += clock() - t0
    while reason is None:
        t0 = clock()
        draft = proposer.propose(ctx)
        t1 = clock()
        past = target.past
        scores = target.verify(ctx.tokens[-1], draft.tokens, draft.parents, draft.extra_tokens,
                               draft.extra_mask, draft.extra_offsets)
        t2 = clock()
        acceptance = rule(draft.parents, draft.tokens, scores.logits, draft.q_draft, sampling, generator, **options)
        new, reason = stop.cut(generated, acceptance.tokens)
        target.commit(past, acceptance.path)
        generated += new
        last = acceptance.path[-1]
        ctx.tokens += new
        ctx.hidden = scores.hidden[acceptance.path]
        ctx.logits = scores.logits[last]
        ctx.scores = scores
        ctx.remaining = stop.max_new_tokens - len(generated)
        accepted_lengths.append(len(new))
        draft_sizes.append(len(draft.tokens))
        _position_counts(draft, acceptance, attempted, accepted)
        t3 = clock()
        if reason is None:
            proposer.observe(Step(draft, acceptance, new), ctx)
        t4 = clock()
        draft_time += (t1 - t0) + (t4 - t3)
        verify_time += t2 - t1
        bookkeeping_time += t3 - t2
    wall = clock() - start
    return TurnResult(generated, len(prompt_ids), wall, prefill_time, draft_time, verify_time,
                      bookkeeping_time, accepted_lengths, draft_sizes, attempted, accepted, reason)
