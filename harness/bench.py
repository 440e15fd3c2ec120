"""`specdec-bench`: one target model x one method x one benchmark -> one run folder.

    specdec-bench method=pld bench.limit=10 max_new_tokens=128
    specdec-bench -m method=vanilla,pld,lookahead          # one sweep folder, one sub-folder per job
    specdec-bench run_dir=runs/x resume=true               # continue a killed run
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from harness.engine.acceptance import Sampling
from harness.infra.app import hydra_app
from harness.data.questions import Question, load_questions, question_file
from harness.engine.loop import Proposer, StopCriteria, TurnResult, decode_turn
from harness.infra.errors import HarnessError
from harness.infra.settings import BENCH, check_settings
from harness.infra.signals import Stopped, graceful_stop, resume_command
from harness.engine.lossless import LosslessCheck, mismatch_details, parse_tolerance
from harness.engine import metrics as glossary
from harness.model.loading import LoadedModel, load_model
from harness.plan import check_fits
from harness.model.quantization import weight_memory_bytes
from harness.infra.store import RUN_INFO, RunStore, file_sha256, hardware, read_json
from harness.model.device import resolve_device, resolve_dtype
from harness.engine.target import Target
from harness.engine.timing import host_probe
from harness.infra.tracking import Tracker, head_artifact
from harness.heads.checkpoint import head_weights_sha256, trained_head_artifact
from reports.compare import check_baseline, check_baseline_run, speedups_against, sweep_vanilla

log = logging.getLogger(__name__)


HEAD_KEYS = re.compile(r"\$\{head:([^}]*)\}")


def head_info(method_cfg: DictConfig) -> dict | None:
    """The draft head a method runs, for run.json, the summary, W&B and the reports: {type, path, untrained,
    sha256 of its weight files (a local folder; None for a Hub id)}; None for a method without one (vanilla, pld, lookahead, sps, ...)."""
    head_type = getattr(get_class(method_cfg._target_), "head_type", None)
    if not head_type:
        return None
    path = method_cfg.get("head_path")
    return {"type": head_type, "path": str(path) if path else None, "untrained": not path,
            "sha256": head_weights_sha256(path)}


def check_head(method_cfg: DictConfig, model_name: str, allow_untrained: bool) -> None:
    """A head method with no head is refused before anything loads: its drafts would be near-random and its row
    a meaningless speed number. `allow_untrained=true` runs it anyway (plumbing, tests); the row is marked."""
    info = head_info(method_cfg)
    if not info or not info["untrained"] or allow_untrained:
        return
    unresolved = str(OmegaConf.to_container(method_cfg, resolve=False).get("head_path"))
    found = HEAD_KEYS.search(unresolved)
    key = found.group(1).split(",")[0].strip() if found else method_cfg.name
    raise HarnessError(f"method {method_cfg.name} has no trained {info['type']} head for model {model_name} "
                       f"(model.heads.{key} is empty): set model.heads.{key}=<head folder or Hub id> (or "
                       f"method.head_path=), or allow_untrained=true to time a random head (its rows are marked "
                       f"UNTRAINED)")


def build_method(method_cfg: DictConfig):
    """`conf/method/<name>.yaml` -> a Proposer (or a runner with `generate_turn`), by `_target_`. Callers that run
    it on a benchmark call check_head first (a head method without a head is refused unless allow_untrained)."""
    params = OmegaConf.to_container(method_cfg, resolve=True)
    name = params.pop("name")
    try:
        method = instantiate(params, _convert_="all")
    except InstantiationException as exc:
        # a method's own one-line HarnessError (a bad parameter) reaches the user unwrapped
        if isinstance(exc.__cause__, HarnessError):
            raise exc.__cause__ from None
        raise
    method.name = name
    return method


class Runner:
    """Runs one turn with a method: Proposers go through the harness loop; peers run themselves."""

    def __init__(self, method, loaded: LoadedModel, cfg: DictConfig):
        self.method, self.loaded = method, loaded
        self.target = Target(loaded.model)
        self.sampling = Sampling(float(cfg.decoding.temperature), float(cfg.decoding.top_p))
        template = loaded.template
        self.stop = StopCriteria(frozenset(template.stop_token_ids), tuple(template.stop_strings),
                                 loaded.tokenizer, int(cfg.max_new_tokens))
        self.context_limit = context_limit(cfg, loaded.model.config)
        self.context_reserve = int(OmegaConf.select(cfg, "context.reserve", default=0) or 0)
        method.setup(loaded)

    def turn(self, prompt_ids: list[int], generator: torch.Generator | None, max_new_tokens: int | None = None
             ) -> TurnResult:
        stop = self.stop
        if max_new_tokens is not None:
            stop = StopCriteria(stop.token_ids, stop.strings, stop.tokenizer, max_new_tokens)
        if self.context_limit is not None:
            # EAGLE's rule: stop before prompt + answer + one verify input would pass the model's positions
            room = self.context_limit - self.context_reserve - len(prompt_ids)
            if room < stop.max_new_tokens:
                if room < 1:
                    log.warning("a %d-token prompt leaves no room under context.limit=%d (reserve %d): one token "
                                "is generated", len(prompt_ids), self.context_limit, self.context_reserve)
                stop = StopCriteria(stop.token_ids, stop.strings, stop.tokenizer, max(1, room), "context")
        if isinstance(self.method, Proposer):
            return decode_turn(self.target, self.method, prompt_ids, self.sampling, stop, generator)
        return self.method.generate_turn(self.target, prompt_ids, self.sampling, stop, generator)


def context_limit(cfg: DictConfig, model_config) -> int | None:
    """bench `context.limit`: positions a turn may fill (prompt + answer); auto = the model's
    max_position_embeddings (None where the config has none), null = no cap."""
    limit = OmegaConf.select(cfg, "context.limit", default=None)
    if limit == "auto":
        found = getattr(model_config, "max_position_embeddings", None)
        return int(found) if found else None
    return None if limit is None else int(limit)


def turn_record(index: int, result: TurnResult, text: str) -> dict:
    return {"turn": index, "new_tokens": result.new_tokens, "prompt_tokens": result.prompt_tokens,
            "wall_time": result.wall_time, "tokens_per_s": glossary.tokens_per_s(result.new_tokens, result.wall_time),
            "prefill_time": result.prefill_time, "draft_time": result.draft_time,
            "verify_time": result.verify_time, "bookkeeping_time": result.bookkeeping_time,
            "steps": result.steps, "tau": glossary.tau(result.new_tokens, result.steps),
            "accepted_lengths": result.accepted_lengths, "draft_sizes": result.draft_sizes,
            "pos_attempted": result.pos_attempted, "pos_accepted": result.pos_accepted,
            "stop_reason": result.stop_reason, "token_ids": result.token_ids, "text": text}


def answer_question(runner: Runner, question: Question, seed: int) -> list[dict]:
    """Both turns; turn 2's prompt carries this method's own turn-1 answer (FastChat / Spec-Bench)."""
    template, tokenizer = runner.loaded.template, runner.loaded.tokenizer
    turns = []
    device = runner.target.output_device      # where the logits it samples from come out
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + question.question_id)
    for index in range(len(question.turns)):
        prompt_ids = template.turn_prompt(question.turns, [t["text"] for t in turns])
        result = runner.turn(prompt_ids, generator)
        text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        turns.append(turn_record(index, result, text))
    return turns


def warm_up(runner: Runner, question: Question, count: int, tokens: int | None) -> None:
    """Untimed generations so lazy init, allocator growth and kernel selection stay off the clock: `count`
    times either the first turn for `tokens` new tokens, or (tokens=None) the whole question, every turn at
    max_new_tokens, as Spec-Bench warms up (3 times its first question)."""
    prompt_ids = runner.loaded.template.encode([(question.turns[0], None)])
    for _ in range(count):
        if tokens is None:
            answer_question(runner, question, 0)
        else:
            runner.turn(prompt_ids, torch.Generator(device=runner.target.output_device).manual_seed(0), tokens)


class HostProbe:
    """The machine's own speed while a run is timed (the glossary's host step): `measure` appends one probe
    to run.json `host_probes`, after the warm-up and after the last question of each sitting, so a sweep
    resumed on another day shows whether its jobs and their vanilla ran on an equally fast host; every
    `every` questions too, so a long sitting shows drift inside it."""

    def __init__(self, store: RunStore, runner: Runner, first: Question, repeats: int, every: int = 0):
        self.store, self.runner, self.repeats = store, runner, repeats
        self.every = every if repeats else 0
        self.prompt_ids = runner.loaded.template.encode([(first.turns[0], None)])

    def probes(self) -> list[dict]:
        return (read_json(self.store.dir / RUN_INFO) or {}).get("host_probes", [])

    def measure(self) -> None:
        if self.repeats:
            found = host_probe(self.runner.target, self.prompt_ids, self.repeats, len(self.store.finished_ids()))
            self.store.update_info({"host_probes": [*self.probes(), found]})

    def step_ms(self) -> float | None:
        value = glossary.host_step_ms(self.probes())
        return None if value != value else value


def warmup_tokens(cfg: DictConfig) -> int | None:
    value = cfg.get("warmup_tokens")
    return None if value is None else int(value)


# What a reference run must share with this run for a token-by-token comparison to mean anything: the target
# (weights, tokenizer, template, dtype, quantization), the decoding, the answer length and the turns.
MODEL_KEYS_IGNORED = ("heads", "device_map", "max_memory")    # where the weights sit, not what they compute


def _like_for_like(cfg: dict, device: str | None = None) -> dict:
    """`device`: where the run ran (run.json's hardware.device), else cfg.device resolved here; dtype auto
    means fp32 on a CPU and fp16 on a GPU, so it is compared resolved."""
    model = {k: v for k, v in (cfg.get("model") or {}).items() if k not in MODEL_KEYS_IGNORED}
    dtype = model.get("dtype", "auto")
    where = resolve_device(device or cfg.get("device") or "auto")
    model["dtype"] = str(resolve_dtype(dtype, where)).removeprefix("torch.")     # fp32 and float32 alike
    return {"model": model, "decoding": cfg.get("decoding"), "max_new_tokens": cfg.get("max_new_tokens"),
            "bench.max_turns": (cfg.get("bench") or {}).get("max_turns"), "context": cfg.get("context")}


def reference_differences(reference_info: dict, cfg: dict) -> list[str]:
    """The settings in which a reference run (its run.json) differs from this run's resolved config (empty:
    comparable token by token)."""
    theirs = _like_for_like(reference_info.get("config") or {}, (reference_info.get("hardware") or {}).get("device"))
    mine = _like_for_like(cfg)
    changed = []
    for key in mine:
        if isinstance(mine[key], dict) and isinstance(theirs[key], dict):
            changed += [f"{key}.{k} ({theirs[key].get(k)} vs {mine[key].get(k)})"
                        for k in sorted(mine[key].keys() | theirs[key].keys()) if theirs[key].get(k) != mine[key].get(k)]
        elif theirs[key] != mine[key]:
            changed.append(f"{key} ({theirs[key]} vs {mine[key]})")
    return changed


def load_reference(path: str | None, cfg: DictConfig | None = None, question_ids=()) -> dict[int, dict]:
    """question id -> the reference run's record (its turns' token ids and texts). With `cfg`, the reference is
    refused unless it ran the same target, decoding, max_new_tokens and turns (named in the error) and shares
    at least one of `question_ids`."""
    if not path:
        return {}
    store = RunStore(path)
    if not store.answers.is_file():
        raise HarnessError(f"reference={path} has no answers.jsonl; point it at a finished run folder")
    records = {r["question_id"]: r for r in store.records()}
    if cfg is None:
        return records
    info = read_json(store.dir / RUN_INFO)
    if info is None or "config" not in info:
        raise HarnessError(f"reference={path} has no readable run.json; point it at a run folder the bench wrote")
    changed = reference_differences(info, OmegaConf.to_container(cfg, resolve=True))
    if changed:
        raise HarnessError(f"reference={path} cannot be compared token by token with this run: it differs in "
                           f"{', '.join(changed)}; point it at a run with the same target and settings")
    shared = records.keys() & set(question_ids)
    if not shared:
        raise HarnessError(f"reference={path} answered none of this run's {len(set(question_ids))} questions; point "
                           "it at a run of the same bench selection")
    return records


def run_bench(cfg: DictConfig, run_dir: str | Path) -> dict:
    """The whole benchmark run; returns the summary. Raises HarnessError on bad input."""
    check_settings(cfg, BENCH)
    check_head(cfg.method, cfg.model.name, bool(cfg.get("allow_untrained")))   # before questions, model, folder
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(int(cfg.seed))
    questions = load_questions(cfg.bench)
    source = question_file(cfg.bench)
    reference = load_reference(cfg.reference, cfg, [q.question_id for q in questions])
    parse_tolerance(cfg.get("lossless", {}).get("tolerance"))   # a bad value fails before the model loads
    if reference and float(cfg.decoding.temperature) > 0:
        log.warning("reference=%s is not compared: sampled decoding is lossless in distribution, not token by "
                    "token, so a divergence would say nothing (tests/test_sampling_distribution.py checks the "
                    "distribution); compare greedy runs", cfg.reference)
        reference = {}
    if cfg.get("baseline_run"):    # a vanilla run sharing questions with this one, before the model loads
        check_baseline_run(cfg.baseline_run, [q.question_id for q in questions])
    check_fits(cfg)   # plan.gpu_memory set: refuse a run the memory planner says cannot fit, before loading
    method = build_method(cfg.method)
    store = RunStore(run_dir)
    provenance = {"questions": {"path": str(source), "sha256": file_sha256(source)}}
    # one writer per run folder: a second run/resume is refused here, before the model loads
    with store.lock(), graceful_stop("the question in flight") as stop:
        try:
            return _bench(cfg, store, method, questions, reference, provenance, stop)
        except KeyboardInterrupt:        # a second signal: the question in flight is lost, the finished ones kept
            raise Stopped(f"stopped at once by {stop.name}: {len(store.finished_ids())} finished questions are in "
                          f"{store.answers}; the one in flight is re-run by: "
                          f"{resume_command('bench', store.dir, 'run_dir')}", stop.signum or 2) from None


def from_sweep(cfg: DictConfig, store: RunStore, questions: list[Question], reference: dict):
    """In a sweep: a finished vanilla job with this run's settings is the baseline of its speedups and, with
    greedy decoding and no `reference=`, the lossless reference (when it is like for like). (None, reference)
    when there is none (vanilla listed after this method, or another setting)."""
    sibling = sweep_vanilla(store.dir)
    if sibling is None:
        return None, reference
    log.info("baseline: the sweep's vanilla job %s (speedups in summary.json and W&B)", sibling.path)
    if not reference and float(cfg.decoding.temperature) == 0:
        try:
            reference = load_reference(str(sibling.path), cfg, [q.question_id for q in questions])
            log.info("lossless reference: the same vanilla job")
        except HarnessError as exc:
            log.info("the sweep's vanilla job is not a lossless reference here: %s", exc)
    return sibling, reference


def _bench(cfg: DictConfig, store: RunStore, method, questions: list[Question], reference: dict,
           provenance: dict, stop) -> dict:
    # the folder is opened (a resume checked against its run: settings, hardware, threads, question file) and
    # the baseline checked against it before the model loads; what loading finds is added to run.json after
    info = {"hardware": hardware(resolve_device(cfg.device)), "method": cfg.method.name, "head": head_info(cfg.method),
            "quantization": cfg.model.get("quantization") or "none", **provenance}
    done = store.open(cfg, bool(cfg.resume), info, force=bool(cfg.get("force_resume")))
    baseline = check_baseline(cfg.baseline_run, store.dir) if cfg.get("baseline_run") else None
    if baseline is None and cfg.method.name != "vanilla":
        baseline, reference = from_sweep(cfg, store, questions, reference)
    loaded = load_model(cfg.model, cfg.device)
    store.update_info({"hardware": hardware(loaded.device), "model_source": loaded.source,
                       "quantization": loaded.quantization, "linear": loaded.linear,
                       "weight_memory_bytes": weight_memory_bytes(loaded.model)})
    todo = [q for q in questions if q.question_id not in done]
    untrained = bool(info["head"] and info["head"]["untrained"])
    tracker = Tracker.start(cfg, store.dir, "bench", [cfg.model.name, cfg.method.name, cfg.bench.name,
                                                      "UNTRAINED-head" if untrained else None])
    failed = True
    try:
        runner = Runner(method, loaded, cfg)
        check = LosslessCheck(loaded, cfg.get("lossless", {}).get("tolerance")) if reference else None
        if todo and cfg.warmup:
            warm_up(runner, todo[0], int(cfg.warmup), warmup_tokens(cfg))
        probe = HostProbe(store, runner, questions[0], int(cfg.get("host_probe_repeats") or 0),
                          int(cfg.get("host_probe_every") or 0))
        if todo:
            probe.measure()
        bar = tqdm(todo, desc=f"{cfg.method.name} on {cfg.bench.name}", unit="q", disable=not cfg.progress,
                   initial=0, total=len(todo))
        tokens = seconds = 0.0
        started = time.perf_counter()
        for done_now, question in enumerate(bar, 1):
            if stop.requested:
                break
            turns = answer_question(runner, question, int(cfg.seed))
            record = {"question_id": question.question_id, "category": question.category,
                      "model": cfg.model.name, "method": cfg.method.name, "turns": turns}
            if question.question_id in reference:
                record["lossless"] = check(question, turns, reference[question.question_id])
            store.append(record)
            summed = glossary.totals(turns)
            tokens += summed["new_tokens"]
            seconds += summed["wall_time"]
            bar.set_postfix(tok_s=f"{glossary.tokens_per_s(tokens, seconds):.1f}",
                            tau=f"{glossary.tau(summed['new_tokens'], summed['steps']):.2f}")
            log_progress(done_now, len(todo), started, question.question_id, summed, tokens, seconds)
            tracker.log_record(record)
            if probe.every and done_now % probe.every == 0 and done_now < len(todo):
                probe.measure()                     # off the clock: between two questions
        bar.close()
        if todo:
            probe.measure()
        left = len(questions) - len(store.finished_ids() & {q.question_id for q in questions})
        if stop.requested and left:      # summary.json is written only by a run that finished its questions
            raise Stopped(f"stopped by {stop.name}: {left} of {len(questions)} questions left (every finished one is "
                          f"in {store.answers}); resume with: {resume_command('bench', store.dir, 'run_dir')}",
                          stop.signum)
        records = store.records()
        summary = glossary.summarize(records)
        summary.update(model=cfg.model.name, method=cfg.method.name, bench=cfg.bench.name,
                       run_dir=str(store.dir), head_path=info["head"] and info["head"]["path"],
                       untrained_head=untrained, host_step_ms=probe.step_ms(), host_probes=len(probe.probes()))
        if baseline is not None:
            summary.update(speedups_against(baseline, records))
            ratio = glossary.host_ratio(probe.probes(), baseline.info.get("host_probes"))
            summary["host_vs_baseline"] = ratio if ratio == ratio else None     # NaN: a side without probes
        store.write_summary(summary)
        if summary.get("lossless_mismatch"):
            log.warning("LOSSLESS MISMATCH vs reference %s in %d/%d questions: %s - a bug until shown otherwise "
                        "(answers.jsonl `lossless` holds each divergence)", cfg.reference, summary["lossless_mismatch"],
                        summary["lossless_compared"], mismatch_details(records))
        tracker.log_results(summary, records)
        tracker.artifact(f"answers-{cfg.model.name}-{cfg.method.name}-{store.dir.name}", "answers",
                         [store.answers, store.dir / RUN_INFO, store.dir / "summary.json"])
        if info["head"] and info["head"]["path"] and Path(info["head"]["path"]).is_dir():
            name, files = head_artifact(cfg.model.name, info["head"]["path"])
            trained = trained_head_artifact(info["head"]["path"])
            tracker.artifact(name, "head", files, use=True,       # lineage: train run -> head -> bench runs
                             metadata={"trained_artifact": trained} if trained else None)
            if trained:                                           # a shipped bf16 copy: its training run's own
                tracker.use_named(trained, "trained_head")
        failed = False
        return summary
    finally:
        tracker.finish(failed=failed)


def log_progress(done: int, total: int, started: float, question_id: int, summed: dict, tokens: float,
                 seconds: float) -> None:
    """One log line per finished question (Hydra's bench.log, SLURM job logs): what tqdm's bar shows, with the
    question's own numbers, the rate so far and the ETA."""
    elapsed = time.perf_counter() - started
    log.info("question %d done (%d/%d): %d tokens, %.2f tok/s, tau %.2f; run so far %.2f tok/s; %.0f s elapsed, "
             "ETA %.0f s", question_id, done, total, summed["new_tokens"],
             glossary.tokens_per_s(summed["new_tokens"], summed["wall_time"]),
             glossary.tau(summed["new_tokens"], summed["steps"]), glossary.tokens_per_s(tokens, seconds), elapsed,
             (total - done) * elapsed / done)


def format_summary(summary: dict) -> str:
    tau = summary["tau"]
    lines = [f"{summary['method']} on {summary['model']} / {summary['bench']}: {summary['questions']} questions, "
             f"{summary['new_tokens']} tokens in {summary['wall_time']:.1f} s = {summary['tokens_per_s']:.2f} tokens/s, "
             f"τ = {tau:.2f} (prefill = 1 step; Spec-Bench's decode-steps-only τ "
             f"{summary.get('tau_spec_bench', float('nan')):.2f})"]
    if summary.get("untrained_head"):
        lines.append("UNTRAINED head (allow_untrained=true): random drafts, not a speed number for this method")
    if summary.get("lossless"):
        compared, questions = summary.get("lossless_compared"), summary["questions"]
        lines.append(f"lossless vs reference: {summary['lossless']} questions (compared {compared} of {questions}"
                     + ("; the others are not in the reference" if compared != questions else "")
                     + f"; near-tie: first divergence within {summary.get('lossless_tolerance')} logits of a tie)")
        if summary.get("lossless_mismatch"):
            lines.append(f"WARNING: LOSSLESS MISMATCH in questions "
                         f"{', '.join(map(str, summary['lossless_mismatch_questions']))}")
    if summary.get("speedup") is not None:
        low, high = summary.get("speedup_ci_low"), summary.get("speedup_ci_high")
        shown = (f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None
                 else f"[no interval: {summary.get('speedup_questions')} paired question(s)]")
        lines.append(f"speedup vs {summary['baseline_run']}: {summary['speedup']:.2f}x {shown} (mean of per-question "
                     f"ratios, 95 % paired bootstrap), {summary['speedup_total']:.2f}x (total tokens / total time)"
                     + (f", {summary['speedup_spec_bench']:.2f}x (Spec-Bench: mean tokens/s over mean tokens/s)"
                        if summary.get("speedup_spec_bench") is not None else ""))
    if summary.get("host_step_ms") is not None:
        ratio = summary.get("host_vs_baseline")
        against = ("" if ratio is None else
                   f"; {100 * (ratio - 1):+.1f} % vs the baseline's" + (
                       " - MORE THAN 5 %: the machine, not only the method, differs between the two timings"
                       if abs(ratio - 1) > glossary.HOST_TOLERANCE else ""))
        lines.append(f"host: 1-token target step {summary['host_step_ms']:.2f} ms (median of "
                     f"{summary['host_probes']} probes){against}")
    lines.append(f"run folder: {summary['run_dir']}")
    return "\n".join(lines)


def _run_in_hydra_dir(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    return run_bench(cfg, cfg.run_dir or HydraConfig.get().runtime.output_dir)


main = hydra_app("config", _run_in_hydra_dir, lambda summary: print(format_summary(summary)))


if __name__ == "__main__":
    main()
