"""The verify-cost curve: how long ONE target forward of n tokens takes over a real KV-cache prefix.

On a GPU a forward of 1 or 32 tokens costs about the same (memory bound), so drafting many tokens is
nearly free; on a 2-core CPU the cost grows with every token (compute bound), and a method has to
size its draft to that curve. Methods that choose their draft size from the hardware (tree=auto)
call `measure_verify_latency` directly.

    python -m harness.latency                                   # default model, prefix 256, sizes 1..64
    python -m harness.latency --model smollm2-135m --prompt-len 512 --sizes 1,2,4,8 --threads 2 --tree

It also prints the memory-bandwidth bound of a step on this machine: weight bytes / measured read
bandwidth, and how far the measured 1-token step is from it.

    python -m harness.latency --compare-runtime --dtypes fp32,bf16 --sizes 1,2,16 --threads 2

times the CPU runtime options side by side in one process, interleaved over --rounds: nn.Linear through torch's
default kernels or oneDNN with packed weights (model.cpu_linear), and the KV cache grown by torch.cat or written
into a buffer (harness/engine/kv.py), on the same model object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from harness.engine.timing import (DEFAULT_SIZES, FILLER, bandwidth_bound, filler_ids, format_bound, format_curve,
                                   measure_read_bandwidth, measure_verify_latency)
from harness.engine.target import Target
from harness.infra.errors import HarnessError



def prefix_ids(loaded, length: int, questions: str | None = None) -> tuple[list[int], str]:
    """`length` prompt tokens: MT-Bench first turns in the model's template when a question file is at
    hand (--questions, else $SPECDEC_DATA; nothing is downloaded), else a fixed English paragraph."""
    from harness.data.questions import parse_questions

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
    return filler_ids(loaded, length, text), source


def compare_runtime(args, sizes: list[int]) -> int:
    """Every CPU runtime option on the same loaded model, interleaved, one table (median over rounds of the
    per-round medians)."""
    import statistics

    from harness.model.loading import load_model, model_config
    from harness.model.packing import set_packed

    results: dict[tuple, list[dict[int, float]]] = {}
    models = {}
    for dtype in [d for d in args.dtypes.split(",") if d.strip()]:
        cfg = model_config(args.model)
        if args.model_path:
            cfg.path = args.model_path
        cfg.cpu_linear = "onednn"
        models[dtype] = load_model(cfg, args.device, dtype)
    prompt, source = prefix_ids(next(iter(models.values())), args.prompt_len, args.questions)
    options = [(linear, kv) for linear in ("default", "onednn") for kv in ("cat", "buffered")]
    for _ in range(args.rounds):
        for dtype, loaded in models.items():
            for linear, kv in options:
                set_packed(loaded.model, linear == "onednn")
                target = Target(loaded.model, buffered_kv=kv == "buffered")
                curve = measure_verify_latency(target, prompt, sizes, args.repeats, args.warmup, args.tree)
                results.setdefault((dtype, linear, kv), []).append(curve)
                target.cache = None
    print(f"# {args.model} on {next(iter(models.values())).device} ({torch.get_num_threads()} threads), prefix "
          f"{len(prompt)} tokens of {source}, {'flat tree' if args.tree else 'chain'}, median of {args.repeats} "
          f"per round, median of {args.rounds} interleaved rounds")
    base = {}
    header = "dtype  linears  kv        " + "  ".join(f"{f'{n} tok ms':>9}" for n in sizes) \
        + "  " + "  ".join(f"{f'v{n}/v1':>7}" for n in sizes if n != 1) + "  1-token vs default+cat"
    print(header)
    for (dtype, linear, kv), curves in results.items():
        ms = {n: 1e3 * statistics.median(c[n] for c in curves) for n in sizes}
        base.setdefault(dtype, ms)
        ratios = "  ".join(f"{ms[n] / ms[sizes[0]]:7.2f}" for n in sizes if n != 1)
        print(f"{dtype:5}  {linear:7}  {kv:8}  " + "  ".join(f"{ms[n]:9.2f}" for n in sizes) + f"  {ratios}  "
              f"{base[dtype][sizes[0]] / ms[sizes[0]]:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model name")
    parser.add_argument("--model-path", default=None, help="a local HF folder (model.path)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="model.dtype (auto, fp32, bf16, fp16)")
    parser.add_argument("--cpu-linear", default=None, choices=("auto", "onednn", "off"),
                        help="model.cpu_linear: nn.Linear through oneDNN with packed weights (default: the config's)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--prompt-len", type=int, default=256, help="KV-cache prefix length in tokens")
    parser.add_argument("--questions", default=None, help="question.jsonl for a real prefix (default: $SPECDEC_DATA)")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated token counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tree", action="store_true", help="flat tree (explicit mask) instead of a chain")
    parser.add_argument("--bandwidth-mb", type=int, default=256,
                        help="size of the read-bandwidth benchmark tensor (MiB); 0 = skip the bound")
    parser.add_argument("--compare-runtime", action="store_true",
                        help="time linears default/onednn x KV cat/buffered side by side (CPU)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="with --compare-runtime: the dtypes to load")
    parser.add_argument("--rounds", type=int, default=3, help="with --compare-runtime: interleaved rounds")
    parser.add_argument("--json", default=None, help="also write {size: seconds} to this file")
    args = parser.parse_args(argv)
    try:
        from harness.model.loading import load_model, model_config

        if args.threads:
            torch.set_num_threads(args.threads)
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        if args.compare_runtime:
            return compare_runtime(args, sizes)
        cfg = model_config(args.model)
        if args.model_path:
            cfg.path = args.model_path
        if args.cpu_linear:
            cfg.cpu_linear = args.cpu_linear
        loaded = load_model(cfg, args.device, args.dtype)
        prompt, source = prefix_ids(loaded, args.prompt_len, args.questions)
        target = Target(loaded.model)
        curve = measure_verify_latency(target, prompt, sizes, args.repeats, args.warmup, args.tree)
        bound = None
        if args.bandwidth_mb:
            from harness.model.quantization import weight_memory_bytes

            bandwidth = measure_read_bandwidth(target.device, args.bandwidth_mb)
            bound = bandwidth_bound(weight_memory_bytes(loaded.model), bandwidth, curve.get(1))
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# {loaded.name} on {loaded.device} ({torch.get_num_threads()} threads, {loaded.dtype}, "
          f"linears: {loaded.linear}), "
          f"prefix {len(prompt)} tokens of {source}, {'flat tree' if args.tree else 'chain'}, "
          f"median of {args.repeats}")
    print(format_curve(curve))
    if bound is not None:
        print(format_bound(bound))
    if args.json:   # the curve only: harness/engine/sizing.py reads this file as {size: seconds}
        Path(args.json).write_text(json.dumps({str(k): v for k, v in curve.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
