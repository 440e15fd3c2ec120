"""Timing the target: the verify-cost curve (ONE forward of n tokens over a real KV-cache prefix), the
read bandwidth and the memory-bandwidth bound of a step. The CLI around it is `python -m harness.latency`;
auto-sized methods (harness/engine/sizing.py) call `measure_verify_latency` directly."""

from __future__ import annotations

import math
import statistics
from datetime import datetime, timezone

import torch

from harness.engine.loop import Clock
from harness.engine.target import Target
from harness.engine.tree import compact_cache
from harness.infra.errors import HarnessError

DEFAULT_SIZES = (1, 4, 8, 16, 32, 64)


def _parents(size: int, tree: bool) -> tuple[int, ...]:
    """size - 1 draft nodes after the root: a chain, or all siblings of the root (a flat tree, which
    needs the explicit 4-D tree mask instead of the causal fast path)."""
    if tree:
        return (-1,) * (size - 1)
    return tuple(range(-1, size - 2))


@torch.inference_mode()
def measure_verify_latency(target: Target, prompt_ids: list[int] | None, sizes=DEFAULT_SIZES, repeats: int = 5,
                           warmup: int = 1, tree: bool = False) -> dict[int, float]:
    """Median seconds of one verify forward of n tokens (root + n - 1 draft tokens) for each n in `sizes`.

    Prefills `prompt_ids` first; with None, the target's current cache is the prefix. After every
    forward the cache is cut back to the prefix, so it is left as it was.
    """
    if any(int(size) < 1 for size in sizes):
        raise HarnessError(f"verify sizes must be >= 1 token (got {list(sizes)})")
    if repeats < 1:
        raise HarnessError(f"repeats={repeats} must be >= 1")
    if prompt_ids is not None:
        target.prefill(prompt_ids)
    elif target.cache is None:
        raise HarnessError("measure_verify_latency: no prompt_ids and no cache to measure over; pass prompt_ids")
    clock = Clock(target.devices)
    past = target.past
    # stand-in draft tokens: real ids from the prompt, cycled (the cost of a dense forward does not
    # depend on which ids it sees)
    pool = list(prompt_ids or []) or [0]
    root = pool[-1]
    inputs = {int(size): ([pool[i % len(pool)] for i in range(int(size) - 1)], _parents(int(size), tree))
              for size in sizes}
    times: dict[int, list[float]] = {size: [] for size in inputs}
    # round-robin over the sizes (every size once per round, warm-up rounds first): a host that drifts while
    # the curve is measured slows every size alike, so the curve's shape -- what a sizer reads -- holds
    for attempt in range(warmup + repeats):
        for size, (draft, parents) in inputs.items():
            start = clock()
            target.verify(root, draft, parents)
            elapsed = clock() - start
            compact_cache(target.cache, past, [])   # drop every verify entry: the prefix stays as it was
            if attempt >= warmup:
                times[size].append(elapsed)
    return {size: statistics.median(values) for size, values in times.items()}


def host_probe(target: Target, prompt_ids: list[int], repeats: int, done: int) -> dict:
    """How fast this machine runs the target right now, apart from any method: the median of `repeats` 1-token
    steps over `prompt_ids` (the bench's first prompt, the same for every method of a sweep), with the time and
    how many questions the run had finished. The cache is left holding the prompt; every turn prefills anew."""
    seconds = measure_verify_latency(target, prompt_ids, sizes=(1,), repeats=repeats)[1]
    return {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "done": int(done),
            "step_ms": round(seconds * 1e3, 4), "repeats": int(repeats)}


@torch.inference_mode()
def measure_read_bandwidth(device: torch.device | str, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second one `sum` over a large fp32 tensor reads on `device` (best of `repeats`): the
    memory stream a decoding step is bound by, at the current thread count. The tensor is far larger
    than any cache level here, so it measures DRAM (or HBM), not cache."""
    if megabytes < 1 or repeats < 1:
        raise HarnessError(f"bandwidth benchmark needs megabytes >= 1 and repeats >= 1 (got {megabytes}, {repeats})")
    device = torch.device(device)
    data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    clock = Clock(device)
    data.sum()                            # first touch and kernel selection off the clock
    best = math.inf
    for _ in range(repeats):
        start = clock()
        data.sum()
        best = min(best, clock() - start)
    return data.numel() * data.element_size() / best


def bandwidth_bound(weight_bytes: int, bandwidth: float, step_seconds: float | None = None) -> dict:
    """The memory-bandwidth bound of a decoding step: every weight read once per step (the KV cache and
    activations are left out, and an untied input embedding is only gathered, so the true bound is a
    little lower still), next to the measured 1-token step."""
    bound = weight_bytes / bandwidth
    return {"weight_bytes": int(weight_bytes), "bandwidth_bytes_per_s": bandwidth, "bound_s": bound,
            "step_s": step_seconds, "x_bound": step_seconds / bound if step_seconds else None}


def format_bound(bound: dict) -> str:
    text = (f"bound: {bound['weight_bytes'] / 1e6:.0f} MB / {bound['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s = "
            f"{bound['bound_s'] * 1e3:.2f} ms per step")
    if bound["step_s"]:
        text += f"; 1-token step measured {bound['step_s'] * 1e3:.2f} ms = {bound['x_bound']:.1f}x the bound"
    return text


def format_curve(seconds: dict[int, float]) -> str:
    base = seconds.get(1)
    lines = [f"{'tokens':>6} {'ms/forward':>11} {'ms/token':>9} {'x 1-token':>9}"]
    for size, value in seconds.items():
        ratio = f"{value / base:9.2f}" if base else f"{'-':>9}"
        lines.append(f"{size:>6} {value * 1e3:>11.2f} {value * 1e3 / size:>9.2f} {ratio}")
    return "\n".join(lines)


FILLER = ("Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
          "experiences and must-see attractions. Then explain, step by step, how a hash table handles "
          "collisions, and give an example in Python with comments for every line. ")


def filler_ids(loaded, length: int, text: str = FILLER) -> list[int]:
    """`length` prompt tokens of `text` in the model's chat template (repeated as needed): a prefix to time
    over (the content does not change a dense forward's cost)."""
    ids = loaded.template.encode([(text, None)])
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]
