"""Scratch measurement (issue 16, item 3): the compiler options for the CPU target, side by side in one process.

Eager with packed oneDNN linears (the harness's default, model.cpu_linear=auto) against torch.compile with
Inductor (CPU freezing: weights constant-folded and prepacked by Inductor itself) and against ZenDNN's
`zentorch` backend, on the same prefix and the same verify sizes; then how far each compiled body's logits
are from eager's (max |diff|, argmax agreement over a 16-token verify).

    OMP_NUM_THREADS=2 python scripts/compile_options.py --dtype fp32 --sizes 1,2,16
    PYTHONPATH=<dir with zentorch> python scripts/compile_options.py --dtype bf16 --backends inductor,zentorch

Not part of the harness: a record of what was tried (docs/cpu_runtime.md quotes its output).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness.engine.tree import compact_cache
from harness.engine.target import Target
from harness.engine.timing import measure_verify_latency
from harness.latency import prefix_ids
from harness.model.loading import load_model, model_config
from harness.model.packing import set_packed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--sizes", default="1,2,16")
    parser.add_argument("--backends", default="inductor,zentorch")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = model_config("smollm2-135m")
    cfg.cpu_linear = "onednn"
    loaded = load_model(cfg, "cpu", args.dtype)
    prompt, _ = prefix_ids(loaded, args.prompt_len)
    body = getattr(loaded.model, loaded.model.base_model_prefix)

    import torch._dynamo.config as dynamo_config
    # the decoder layers break the graph at the KV cache update and recompile per layer: room for all of them
    dynamo_config.recompile_limit = 512
    dynamo_config.accumulated_recompile_limit = 8192
    compiled = {}
    for backend in [b for b in args.backends.split(",") if b]:
        start = time.perf_counter()
        set_packed(loaded.model, False)      # the compiler sees plain nn.Linear and packs for itself
        if backend == "inductor":
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
            fn = torch.compile(body, backend="inductor", dynamic=True)
        elif backend == "zentorch":
            import zentorch  # noqa: F401  (registers the backend)
            fn = torch.compile(body, backend="zentorch", dynamic=True)
        else:
            raise SystemExit(f"unknown backend {backend}")
        target = Target(loaded.model, buffered_kv=True)
        target.body = fn
        try:
            measure_verify_latency(target, prompt, sizes, 1, 2)    # compiles every shape once
        except Exception as error:   # a backend that cannot take this model: say so and go on
            print(f"{backend}: failed to compile/run: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            continue
        compiled[backend] = fn
        print(f"{backend}: compiled and warmed in {time.perf_counter() - start:.0f} s")

    options = [("eager+packed", None), ("eager", None), *compiled.items()]
    results: dict[str, list[dict[int, float]]] = {}
    for _ in range(args.rounds):
        for name, fn in options:
            set_packed(loaded.model, name == "eager+packed")
            target = Target(loaded.model, buffered_kv=True)
            if fn is not None:
                target.body = fn
            results.setdefault(name, []).append(measure_verify_latency(target, prompt, sizes, args.repeats, 1))
    print(f"# smollm2-135m {args.dtype}, {args.threads} threads, prefix {len(prompt)}, median of {args.repeats} "
          f"per round, median of {args.rounds} interleaved rounds")
    print("option        " + "  ".join(f"{f'{n} tok ms':>9}" for n in sizes) + "  vs eager+packed (1 tok)")
    base = None
    for name, curves in results.items():
        ms = {n: 1e3 * statistics.median(c[n] for c in curves) for n in sizes}
        base = base or ms
        print(f"{name:12}  " + "  ".join(f"{ms[n]:9.2f}" for n in sizes) + f"  {base[sizes[0]] / ms[sizes[0]]:.2f}x")

    # agreement with eager+packed on one 16-token verify over the prefix
    draft = prompt[-16:-1]
    reference = None
    for name, fn in options:
        set_packed(loaded.model, name == "eager+packed")
        target = Target(loaded.model, buffered_kv=True)
        if fn is not None:
            target.body = fn
        with torch.inference_mode():
            target.prefill(prompt)
            past = target.past
            logits = target.verify(prompt[-1], draft, tuple(range(-1, len(draft) - 1))).logits.float()
        compact_cache(target.cache, past, [])
        if reference is None:
            reference = logits
        diff = (logits - reference).abs().max().item()
        same = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"{name:12}  max |logit diff| vs eager+packed {diff:.2e}, argmax agreement {same:.3f}")


if __name__ == "__main__":
    main()
