"""Weights & Biases mirror of a run folder. The folder is the record: W&B failing, unreachable or
disabled never fails a run and never loses local results; `finish()` always runs.

Every app (bench, distill, train, report) starts one `Tracker`:
- config = the resolved Hydra config; project/entity/mode from `logger.wandb` (offline by default:
  no account needed, `wandb sync <run_dir>/wandb/offline-run-*` later);
- name = the job's command-line overrides, as Hydra's `hydra.job.override_dirname` spells them
  (`method=pld,model=smollm2-135m`), else the run folder's name;
- group = `logger.wandb.group`, else, in a multirun, the sweep folder's name, so one sweep is one group;
- job_type = bench / distill / train / report; tags = model, method, bench (+ `logger.wandb.tags`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.engine import metrics as glossary
from harness.engine.lossless import question_status

log = logging.getLogger(__name__)

# Overrides that say where or how a job runs, not what it measures: left out of the W&B run name.
NAME_EXCLUDED = ("run_dir", "resume", "force_resume", "progress", "logger", "hydra", "reference", "lossless", "baseline_run",
                 "bench.path", "model.path")


def _hydra_config():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - outside a Hydra app there is simply no Hydra config
        return None


def run_name(default: str) -> str:
    """`hydra.job.override_dirname` without location-only keys (`run_dir=`, `logger.*`, ...)."""
    hydra_cfg = _hydra_config()
    if hydra_cfg is None:
        return default
    kept = []
    for override in hydra_cfg.overrides.task:
        key = override.lstrip("+~").split("=", 1)[0]
        if not key.startswith(NAME_EXCLUDED):
            kept.append(override.lstrip("+~"))
    # W&B shows at most 128 characters of a name
    return ",".join(sorted(kept))[:128] or default


def sweep_group() -> str | None:
    """The sweep folder's name in a multirun (one sweep = one W&B group), else None."""
    from harness.infra.app import sweep_dir

    folder = sweep_dir()
    return folder.name if folder is not None else None


def wandb_host() -> tuple[str, int]:
    """The W&B server this process would talk to (WANDB_BASE_URL, else api.wandb.ai), as (host, port)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def wandb_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the W&B server, a few seconds at most: online W&B without a network otherwise
    waits ~90 s in wandb.init and then turns itself off for the whole run without a word."""
    import socket

    try:
        socket.create_connection(wandb_host(), timeout=timeout).close()
        return True
    except OSError:
        return False


def define_metrics(run, job_type: str) -> None:
    """So a run's W&B summary means what it says: the per-turn curves (`turn/*`, one W&B step per turn) are
    plotted against `turn_index` and kept out of the summary (it would otherwise hold the LAST turn's τ next
    to the run's τ); the run-level numbers are written to the summary once, at the end (log_results)."""
    if job_type != "bench":
        return
    try:
        run.define_metric("turn_index", hidden=True)
        for name in ("turn/*", "question_id", "turn"):
            run.define_metric(name, step_metric="turn_index", summary="none")
    except Exception as exc:  # noqa: BLE001 - a mirror: never fail a run
        log.warning("W&B define_metric failed: %s", exc)


def acceptance_rows(records: list[dict]) -> list[dict]:
    """Acceptance per draft position as a long table (position, attempts, accepted, rate): W&B plots it (a bar
    or line chart over `position`), and the counts say how much each rate rests on."""
    attempted, accepted = glossary.position_counts(glossary.turns_of(records))
    return [{"position": k + 1, "attempts": tried, "accepted": took, "rate": took / tried if tried else None}
            for k, (tried, took) in enumerate(zip(attempted, accepted))]


HEAD_FILES = ("model.safetensors", "head_config.json")


def head_artifact(model_name: str, folder: str | Path) -> tuple[str, list[Path]]:
    """The W&B artifact of a head folder: its name (model and folder name: a training output_dir and a bench's
    head_path to it give the same one) and the files that identify it."""
    folder = Path(folder)
    return f"head-{model_name}-{folder.name}", [folder / name for name in HEAD_FILES]


def _scalar(value) -> bool:
    return isinstance(value, (int, float, str, bool)) and not (isinstance(value, float) and math.isnan(value))


def flat_metrics(summary: dict) -> dict:
    """A run summary as W&B summary keys: lists and dicts become `key/pos{k}` entries."""
    flat = {}
    for key, value in summary.items():
        if key == "acceptance_per_position" and value:
            flat.update({f"acceptance/pos{k + 1}": v for k, v in enumerate(value) if v is not None})
        elif key == "topk_accuracy" and isinstance(value, dict):
            flat.update({f"topk_accuracy/{k}": v for k, v in value.items() if _scalar(v)})
        elif key == "lossless_mismatch_questions" and value:
            flat[key] = ", ".join(map(str, value))       # W&B shows the mismatched questions by name
        elif isinstance(value, dict):
            flat.update({f"{key}/{k}": v for k, v in value.items() if _scalar(v)})
        elif _scalar(value):
            flat[key] = value
    return flat


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else value      # an empty W&B table cell, not the string "nan"


def question_row(record: dict) -> dict:
    turns = record["turns"]
    summed = glossary.totals(turns)
    return {"question_id": record["question_id"], "category": record.get("category"), "turns": len(turns),
            "new_tokens": summed["new_tokens"], "wall_time": summed["wall_time"],
            "tokens_per_s": _or_none(glossary.tokens_per_s(summed["new_tokens"], summed["wall_time"])),
            "tau": _or_none(glossary.tau(summed["new_tokens"], summed["steps"])),
            "draft_tokens_per_step": _or_none(glossary.draft_tokens_per_step(summed["draft_tokens"], summed["steps"])),
            "lossless": question_status(record),             # exact / near_tie / mismatch / None
            "answer": turns[0].get("text", "")[:500] if turns else ""}


class Tracker:
    def __init__(self, run=None):
        self.run = run
        self.broken = False        # a logging call failed: log nothing more, but still finish()
        self.turns_logged = 0

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: str | Path, job_type: str, tags: list[str], name: str | None = None,
              group: str | None = None, run_id: str | None = None) -> "Tracker":
        """`run_id`: a fixed W&B run id, resumed when it exists (a report run updated in place)."""
        settings = cfg.get("logger", {}).get("wandb", {}) if cfg.get("logger") else {}
        mode = settings.get("mode", "offline")
        if mode == "disabled":
            return cls(None)
        if mode == "online" and not wandb_reachable():
            log.warning("W&B mode=online but %s:%d cannot be reached: logging offline into %s instead (upload "
                        "later with `wandb sync %s/wandb/offline-run-*`)", *wandb_host(), run_dir, run_dir)
            mode = "offline"
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            run = wandb.init(
                project=settings.get("project", "specdec-harness"), entity=settings.get("entity"),
                group=settings.get("group") or group or sweep_group(), job_type=job_type, mode=mode,
                dir=str(run_dir), name=name or run_name(Path(run_dir).name),
                tags=sorted({str(t) for t in [*tags, *(settings.get("tags") or [])] if t}),
                config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
                **({"id": run_id, "resume": "allow"} if run_id else {}))
            define_metrics(run, job_type)
            return cls(run)
        except Exception as exc:  # noqa: BLE001 - W&B is a mirror; the run goes on without it
            log.warning("W&B disabled for this run: %s", str(exc).splitlines()[0] if str(exc) else exc)
            return cls(None)

    @property
    def active(self) -> bool:
        return self.run is not None and not self.broken

    @property
    def folder(self) -> str | None:
        """The local W&B run folder (`wandb sync` it when mode is offline)."""
        try:
            return str(Path(self.run.dir).parent) if self.run is not None else None
        except Exception:  # noqa: BLE001
            return None

    def _safely(self, fn, *args, **kwargs) -> None:
        if self.run is None or self.broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B logging failed, continuing without it: %s", exc)
            self.broken = True

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._safely(lambda: self.run.log(metrics, step=step))

    def log_record(self, record: dict) -> None:
        """One finished question: one W&B step per turn (the per-turn curves), as it happens."""
        for turn in record["turns"]:
            summed = glossary.totals([turn])
            metrics = {"turn_index": self.turns_logged, "question_id": record["question_id"], "turn": turn["turn"],
                       "turn/new_tokens": turn["new_tokens"], "turn/wall_time": turn["wall_time"],
                       "turn/tokens_per_s": glossary.tokens_per_s(turn["new_tokens"], turn["wall_time"]),
                       "turn/tau": glossary.tau(turn["new_tokens"], turn["steps"]), "turn/steps": turn["steps"]}
            drafted = glossary.draft_tokens_per_step(summed["draft_tokens"], turn["steps"])
            if not math.isnan(drafted):            # methods that do not report drafts get no curve
                metrics["turn/draft_tokens_per_step"] = drafted
            self.log(metrics)
            self.turns_logged += 1

    def summary(self, metrics: dict) -> None:
        def update():
            for key, value in flat_metrics(metrics).items():
                self.run.summary[key] = value
        self._safely(update)

    def table(self, key: str, rows: list[dict]) -> None:
        if not rows:
            return

        def log_table():
            import wandb

            columns = list(rows[0])
            self.run.log({key: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
        self._safely(log_table)

    def images(self, figures: dict[str, str | Path]) -> None:
        """Figures (PNG paths) as `wandb.Image`s, one key each."""
        if not figures:
            return

        def log_images():
            import wandb

            self.run.log({key: wandb.Image(str(path)) for key, path in figures.items()})
        self._safely(log_images)

    def artifact(self, name: str, kind: str, files: list[str | Path], use: bool = False,
                 metadata: dict | None = None) -> None:
        """Files as a W&B artifact: logged as this run's output, or with `use` declared as its input, so W&B's
        lineage links a training run's head to the bench runs that drafted with it (the same name and content
        are the same artifact version). An offline run cannot declare inputs: it names the artifact in its
        summary (`uses/<kind>`) instead. Names keep W&B's alphabet: letters, digits, - _ ."""
        kept = [Path(f) for f in files if Path(f).is_file()]
        if not kept:
            return

        if use and getattr(self.run, "offline", False):
            # W&B cannot declare an offline run's inputs: the summary names the artifact instead (uses/<kind>)
            self._safely(lambda: self.run.summary.update({f"uses/{kind}": name}))
            return

        def record():
            import wandb

            art = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:128], type=kind, metadata=metadata or {})
            for path in kept:
                art.add_file(str(path), name=path.name)
            (self.run.use_artifact if use else self.run.log_artifact)(art)
        self._safely(record)

    def use_named(self, name: str, kind: str) -> None:
        """Declare an already logged artifact (`name`, its latest version) as this run's input, by name only;
        offline, or where this W&B project does not hold it, the summary names it (`uses/<kind>`)."""
        if self.run is None or self.broken:
            return
        if not getattr(self.run, "offline", False):
            try:
                self.run.use_artifact(f"{name}:latest", type=kind)
                return
            except Exception as exc:  # noqa: BLE001 - not in this project (trained elsewhere): named instead
                log.info("W&B artifact %s is not in this project (%s); the summary names it", name, exc)
        self._safely(lambda: self.run.summary.update({f"uses/{kind}": name}))

    def log_results(self, summary: dict, records: list[dict]) -> None:
        """End of a bench run: summary metrics (tokens/s, speedup, τ, lossless counts per status,
        acceptance and top-k accuracy per position) + a table of per-question results. A lossless
        mismatch is also a W&B alert (shown on the run page; sent to Slack/e-mail where set up)."""
        self.summary(summary)
        self.table("questions", [question_row(r) for r in records])
        self.table("acceptance", acceptance_rows(records))
        if summary.get("lossless_mismatch"):
            self._safely(lambda: self.run.alert(
                title="lossless MISMATCH", level="WARN",
                text=f"{summary['lossless']}: questions {', '.join(map(str, summary['lossless_mismatch_questions']))}"))

    def finish(self, failed: bool = False) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B finish failed: %s", exc)
        self.run = None
