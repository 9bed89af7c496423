"""Observers ``progress`` (a tqdm bar on rank 0; off a terminal, plain log lines every ``log_every`` steps and at
least every ``log_seconds``) and ``jsonl_log`` (one JSON line per step and evaluation in
<output_dir>/train_log.jsonl, rank 0)."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field
from tqdm.auto import tqdm

from jsarag.api import Context, Observer, Options, TrainingError, atomic_write, hookimpl

log = logging.getLogger("jsarag.train")
SHOWN = ("acceptance", "unique_states", "ess")  # estimator stats worth a place on the bar


class ProgressOptions(Options):
    log_every: int = Field(10, ge=1)
    """Steps between log lines when output is not a terminal."""
    log_seconds: float = Field(30.0, gt=0)
    """Off a terminal, also log a line when this many seconds passed since the last one."""


class Progress(Observer):
    """A progress bar with loss, key estimator stats, step time and ETA; log lines when not a terminal."""

    Options = ProgressOptions

    def __init__(self, options: ProgressOptions, ctx: Context) -> None:
        super().__init__(options, ctx)
        self.bar: tqdm | None = None
        self.tty = sys.stderr.isatty()
        self.last = self.start = self.logged = time.perf_counter()
        self.start_step = self.max_steps = 0

    def on_train_start(self, start_step: int, max_steps: int) -> None:
        if self.ctx.is_main and self.tty:
            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.last = self.start = self.logged = time.perf_counter()
        self.start_step, self.max_steps = start_step, max_steps

    def on_step_end(self, step: int, loss: float, stats: dict[str, float]) -> None:
        if not self.ctx.is_main:
            return
        now, stop_at = time.perf_counter(), self.ctx.recipe["train"]["stop_at"]
        stop, elapsed = min(self.max_steps, stop_at or self.max_steps), now - self.last
        self.last = now
        shown = {"loss": f"{loss:.4f}", **{k: f"{stats[k]:.3g}" for k in SHOWN if k in stats}, "s/step": f"{elapsed:.2f}"}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif step % self.options.log_every == 0 or step == stop or now - self.logged >= self.options.log_seconds:
            eta = (now - self.start) / (step - self.start_step) * (stop - step)  # evaluations included
            shown["eta"] = tqdm.format_interval(eta)
            log.info("step %d/%d %s", step, self.max_steps, " ".join(f"{k}={v}" for k, v in shown.items()))
            self.logged = now

    def on_eval_end(self, step: int, split: str, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        self.last = time.perf_counter()  # the next step's time leaves the evaluation out
        if self.ctx.is_main:
            text = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            (self.bar.write if self.bar is not None else log.info)(f"eval step {step} {split}: {text}")

    def on_train_end(self, step: int, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()


class JsonlLog(Observer):
    """Append every step's and evaluation's numbers to <output_dir>/train_log.jsonl."""

    def __init__(self, options: Options, ctx: Context) -> None:
        super().__init__(options, ctx)
        self.path: Path = ctx.output_dir / "train_log.jsonl"

    def on_train_start(self, start_step: int, max_steps: int) -> None:
        """On resumption, drop records of steps after the checkpoint: they are about to be redone (all of them when
        the run starts afresh, and a last line a kill tore)."""
        if self.ctx.is_main and self.path.exists():
            kept = [r for r in read_records(self.path) if start_step > 0 and r["step"] <= start_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def _write(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def on_step_end(self, step: int, loss: float, stats: dict[str, float]) -> None:
        self._write({"step": step, "time": time.time(), "loss": loss, **stats})

    def on_eval_end(self, step: int, split: str, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        self._write({"step": step, "time": time.time(), "split": split, **metrics})


def read_records(path: Path) -> list[dict[str, Any]]:
    """Read train_log.jsonl; a last line that a kill tore mid-write is dropped, any other bad line is an error."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s:%d: dropping a torn last line (the run was killed while writing it)", path, number)
                break
            raise TrainingError(f"{path}:{number}: not a JSON record ({exc}); delete that line (or the file) and run "
                                "again") from None
    return records


@hookimpl
def register_observers(register) -> None:
    register("progress", Progress)
    register("jsonl_log", JsonlLog)
