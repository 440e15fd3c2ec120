"""The verify-cost curve: how long ONE target forward of n tokens takes over a real KV-cache prefix.

On a GPU a forward of 1 or 32 tokens costs about the same (memory bound), so drafting many tokens is
nearly free; on a 2-core CPU the cost grows with every token (compute bound), and a method has to
size its draft to that curve. Methods that choose their draft size from the hardware (tree=auto)
call `measure_verify_latency` directly.

    python -m harness.latency                                   # default model, prefix 256, sizes 1..64
    python -m harness.latency --model smollm2-135m --prompt-len 512 --sizes 1,2,4,8 --threads 2 --tree

It also prints the memory-bandwidth bound of a step on this machine: weight bytes / measured read
bandwidth, and how far the measured 1-token step is from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

from harness.decoding import Clock
from harness.errors import HarnessError
from harness.target import Target
from harness.tree import compact_cache

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
    clock = Clock(target.device)
    past = target.past
    # stand-in draft tokens: real ids from the prompt, cycled (the cost of a dense forward does not
    # depend on which ids it sees)
    pool = list(prompt_ids or []) or [0]
    root = pool[-1]
    seconds: dict[int, float] = {}
    for size in sizes:
        size = int(size)
        draft = [pool[i % len(pool)] for i in range(size - 1)]
        parents = _parents(size, tree)
        times = []
        for attempt in range(warmup + repeats):
            start = clock()
            target.verify(root, draft, parents)
            elapsed = clock() - start
            compact_cache(target.cache, past, [])   # drop every verify entry: the prefix stays as it was
            if attempt >= warmup:
                times.append(elapsed)
        seconds[size] = statistics.median(times)
    return seconds


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


def prefix_ids(loaded, length: int, questions: str | None = None) -> tuple[list[int], str]:
    """`length` prompt tokens: MT-Bench first turns in the model's template when a question file is at
    hand (--questions, else $SPECDEC_DATA; nothing is downloaded), else a fixed English paragraph."""
    from harness.data import parse_questions

    source, text = "a built-in paragraph", FILLER
    path = Path(questions) if questions else None
    if path is None and os.environ.get("SPECDEC_DATA"):
        env = Path(os.environ["SPECDEC_DATA"])
        path = env / "spec_bench" / "question.jsonl" if env.is_dir() else env
    if path is not None:
        if not path.is_file():
            raise HarnessError(f"question file {path} does not exist; fix --questions or $SPECDEC_DATA")
        text = " ".join(q.turns[0] for q in parse_questions(path) if q.category != "coding")
        source = f"questions from {path.name}"
    ids = loaded.template.encode([(text, None)])
    while len(ids) < length:
        ids = ids + ids
    return ids[:length], source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model name")
    parser.add_argument("--model-path", default=None, help="a local HF folder (model.path)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--prompt-len", type=int, default=256, help="KV-cache prefix length in tokens")
    parser.add_argument("--questions", default=None, help="question.jsonl for a real prefix (default: $SPECDEC_DATA)")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated token counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tree", action="store_true", help="flat tree (explicit mask) instead of a chain")
    parser.add_argument("--bandwidth-mb", type=int, default=256,
                        help="size of the read-bandwidth benchmark tensor (MiB); 0 = skip the bound")
    parser.add_argument("--json", default=None, help="also write {size: seconds} to this file")
    args = parser.parse_args(argv)
    try:
        from harness.models import load_model, model_config

        if args.threads:
            torch.set_num_threads(args.threads)
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        cfg = model_config(args.model)
        if args.model_path:
            cfg.path = args.model_path
        loaded = load_model(cfg, args.device)
        prompt, source = prefix_ids(loaded, args.prompt_len, args.questions)
        target = Target(loaded.model)
        curve = measure_verify_latency(target, prompt, sizes, args.repeats, args.warmup, args.tree)
        bound = None
        if args.bandwidth_mb:
            from harness.quant import weight_memory_bytes

            bandwidth = measure_read_bandwidth(target.device, args.bandwidth_mb)
            bound = bandwidth_bound(weight_memory_bytes(loaded.model), bandwidth, curve.get(1))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# {loaded.name} on {loaded.device} ({torch.get_num_threads()} threads, {loaded.dtype}), "
          f"prefix {len(prompt)} tokens of {source}, {'flat tree' if args.tree else 'chain'}, "
          f"median of {args.repeats}")
    print(format_curve(curve))
    if bound is not None:
        print(format_bound(bound))
    if args.json:   # the curve only: harness/sizing.py reads this file as {size: seconds}
        Path(args.json).write_text(json.dumps({str(k): v for k, v in curve.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
