"""Interleaved timing: several methods over the same questions in ONE process, taking turns question by
question, so the slow drifts of a shared machine fall on every method alike.

A sweep runs its methods one after another, minutes apart; for two methods within a few percent of each
other that order decides who wins. Here each question is answered by every method back to back, in
alternating order (A B, then B A, ...), and speedups are paired per question: `paired` is the
glossary's geometric mean of per-question ratios, `total` its total tokens / total time
(harness/engine/metrics.py defines both).

    python -m harness.interleave --methods pld,hf_prompt_lookup bench.limit=8 bench.max_turns=1 \
        max_new_tokens=128 threads=2

Positional arguments are Hydra overrides of conf/config.yaml (bench, model, max_new_tokens, threads, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from tqdm import tqdm

from harness import CONF_DIR
from harness.engine import metrics as glossary
from harness.infra.errors import HarnessError


def answer_totals(times: list[float], tokens: list[int]) -> dict[int, dict]:
    """One method's answers as the glossary's per-question totals, keyed by answer index: index i of every
    method is the same question in the same pass, so the speedups pair them."""
    return {i: {"new_tokens": count, "wall_time": seconds} for i, (count, seconds) in enumerate(zip(tokens, times))}


def run(methods: list[str], overrides: list[str], passes: int) -> dict:
    from harness.bench import Runner, answer_question, build_method, check_head, warm_up, warmup_tokens
    from harness.data.questions import load_questions
    from harness.model.loading import load_model

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose(config_name="config", overrides=overrides)
        method_cfgs = {m: compose(config_name="config", overrides=[*overrides, f"method={m}"]).method for m in methods}
    if base.threads:
        torch.set_num_threads(int(base.threads))
    questions = load_questions(base.bench)
    for method_cfg in method_cfgs.values():     # a head method without a head: refused before the model loads
        check_head(method_cfg, base.model.name, bool(base.get("allow_untrained")))
    loaded = load_model(base.model, base.device)
    runners = {m: Runner(build_method(c), loaded, base) for m, c in method_cfgs.items()}
    for runner in runners.values():
        warm_up(runner, questions[0], int(base.warmup), warmup_tokens(base))
    times = {m: [] for m in methods}
    tokens = {m: [] for m in methods}
    answers = {m: [] for m in methods}
    steps = {m: 0 for m in methods}
    drafted = {m: 0 for m in methods}     # verify steps that carried a draft (an auto sizer may decline one)
    verifies = {m: 0 for m in methods}    # verify steps (prefill left out); None where a peer cannot say
    bar = tqdm(total=passes * len(questions) * len(methods), desc="interleaved", unit="answer",
               disable=not base.progress)
    for rep in range(passes):
        for i, question in enumerate(questions):
            order = methods if (i + rep) % 2 == 0 else methods[::-1]
            for name in order:
                turns = answer_question(runners[name], question, int(base.seed))
                times[name].append(sum(t["wall_time"] for t in turns))
                tokens[name].append(sum(t["new_tokens"] for t in turns))
                answers[name].append([t["token_ids"] for t in turns])
                steps[name] += sum(t["steps"] for t in turns)
                if any(t["draft_sizes"] is None for t in turns):
                    verifies[name] = None
                elif verifies[name] is not None:
                    drafted[name] += sum(sum(1 for size in t["draft_sizes"][1:] if size) for t in turns)
                    verifies[name] += sum(max(len(t["draft_sizes"]) - 1, 0) for t in turns)
                bar.update(1)
    bar.close()
    first = methods[0]
    greedy = float(base.decoding.temperature) == 0.0
    reference = answer_totals(times[first], tokens[first])
    rows = []
    for name in methods:
        total_tokens, total_time = sum(tokens[name]), sum(times[name])
        mine = answer_totals(times[name], tokens[name])
        rows.append({"method": name, "answers": len(times[name]), "tokens": total_tokens, "seconds": total_time,
                     "tokens_per_s": glossary.tokens_per_s(total_tokens, total_time),
                     "steps": steps[name], "tau": glossary.tau(total_tokens, steps[name]),
                     "verify_steps": verifies[name],
                     "drafted_steps": None if verifies[name] is None else drafted[name],
                     "ratio_total": glossary.speedup(mine, reference, "total"),
                     "ratio_paired": glossary.speedup(mine, reference, "geometric"),
                     "identical": (sum(a == b for a, b in zip(answers[name], answers[first])) if greedy else None)})
    return {"model": loaded.name, "device": str(loaded.device), "threads": torch.get_num_threads(),
            "questions": len(questions), "passes": passes, "overrides": overrides, "rows": rows}


def format_rows(result: dict) -> str:
    first = result["rows"][0]["method"]
    lines = [f"# {result['model']} on {result['device']} ({result['threads']} threads), {result['questions']} "
             f"questions x {result['passes']} passes, methods alternating per question; ratios over {first}",
             f"{'method':<24} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'tau':>5} {'drafted':>8} {'total':>7} "
             f"{'paired':>7} {'identical':>9}"]
    for row in result["rows"]:
        same = "-" if row["identical"] is None else f"{row['identical']}/{row['answers']}"
        share = "-" if not row["verify_steps"] else f"{row['drafted_steps'] / row['verify_steps']:.0%}"
        lines.append(f"{row['method']:<24} {row['tokens']:>7} {row['seconds']:>8.1f} {row['tokens_per_s']:>7.2f} "
                     f"{row['tau']:>5.2f} {share:>8} {row['ratio_total']:>6.3f}x {row['ratio_paired']:>6.3f}x {same:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.interleave", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", required=True, help="comma-separated conf/method names; the first is the reference")
    parser.add_argument("--passes", type=int, default=1, help="passes over the questions (order flips each pass)")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        if len(methods) < 2 or len(set(methods)) != len(methods):
            raise HarnessError(f"--methods needs two or more distinct method names (got {args.methods!r})")
        if args.passes < 1:
            raise HarnessError(f"--passes must be >= 1 (got {args.passes})")
        from harness.infra.app import check_choices

        for name in methods:
            check_choices([*args.overrides, f"method={name}"])
        result = run(methods, list(args.overrides), args.passes)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_rows(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
