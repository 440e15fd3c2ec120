"""Weights & Biases mirror of a run folder. The folder is the record: W&B failing, unreachable or
disabled never fails a run and never loses local results; `finish()` always runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, run=None):
        self.run = run

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path, job_type: str, tags: list[str], name: str | None = None
              ) -> "Tracker":
        settings = cfg.get("logger", {}).get("wandb", {}) if cfg.get("logger") else {}
        mode = settings.get("mode", "offline")
        if mode == "disabled":
            return cls(None)
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            run = wandb.init(
                project=settings.get("project", "specdec-harness"), entity=settings.get("entity"),
                group=settings.get("group"), job_type=job_type, mode=mode, dir=str(run_dir),
                name=name or Path(run_dir).name, tags=[str(t) for t in [*tags, *(settings.get("tags") or [])]],
                config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
            return cls(run)
        except Exception as exc:  # noqa: BLE001 - W&B is a mirror; the run goes on without it
            log.warning("W&B disabled for this run: %s", str(exc).splitlines()[0] if str(exc) else exc)
            return cls(None)

    def _safely(self, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B logging failed, continuing without it: %s", exc)
            self.run = None

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._safely(lambda: self.run.log(metrics, step=step))

    def summary(self, metrics: dict) -> None:
        def update():
            for key, value in metrics.items():
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

    def finish(self, failed: bool = False) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B finish failed: %s", exc)
        self.run = None
