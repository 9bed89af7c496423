"""Observers ``tensorboard``, ``wandb`` and ``csv``: experiment trackers (rank 0). Each receives, as scalars by
optimizer step, the training loss (``train/loss``), the estimator's statistics (``train/<name>``: its loss terms,
acceptance rate, unique states, ESS, cache hits, gold share, ...), each trained module's learning rate
(``lr/<role>.<name>``) and every evaluation's metrics (``<split>/<metric>``, the step-0 evaluation included).

TensorBoard event files go to ``<output_dir>/tensorboard`` (a resumed run purges the steps it redoes); a Weights &
Biases run to ``<output_dir>/wandb`` (offline by default: no account, no network; ``wandb sync`` uploads it later),
with the resolved recipe as its config, finished when training ends or fails; CSV rows ``step,time,tag,value`` to
``<output_dir>/scalars.csv``. TensorBoard and W&B come with the ``trackers`` extra: ``pip install "jsarag[trackers]"``.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from jsarag.api import Context, Observer, Options, OutputPath, atomic_write, hookimpl

log = logging.getLogger("jsarag.trackers")
Scalars = dict[str, float]


def step_scalars(loss: float, stats: dict[str, float]) -> Scalars:
    """An optimizer step's scalars: ``train/loss``, ``train/<stat>``, and the learning rates as they came (``lr/...``)."""
    return {"train/loss": loss, **{name if name.startswith("lr/") else f"train/{name}": value
                                   for name, value in stats.items()}}


def _require(package: str, observer: str) -> None:
    """Refuse an observer whose library is not installed (found without importing it)."""
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"the {observer} observer needs the '{package}' package, which is not installed: "
                         "pip install \"jsarag[trackers]\"")


class Tracker(Observer):
    """Rank 0 sends every step's and evaluation's scalars to a tracker: ``open`` at the start, ``write`` as they come,
    ``close`` when training ends or fails."""

    def __init__(self, options: Options, ctx: Context) -> None:
        super().__init__(options, ctx)
        self.opened = False

    def open(self, start_step: int) -> None:
        """Start (or, when ``start_step`` > 0, continue) the tracker's record of the run."""

    def write(self, step: int, scalars: Scalars) -> None:
        """Record scalars at an optimizer step."""

    def close(self, failed: bool) -> None:
        """Flush and close the record (``failed``: training stopped on an error)."""

    def on_train_start(self, start_step: int, max_steps: int) -> None:
        if self.ctx.is_main:
            self.open(start_step)
            self.opened = True

    def on_step_end(self, step: int, loss: float, stats: dict[str, float]) -> None:
        if self.opened:
            self.write(step, step_scalars(loss, stats))

    def on_eval_end(self, step: int, split: str, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        if self.opened:
            self.write(step, {f"{split}/{name}": value for name, value in metrics.items()})

    def on_train_end(self, step: int, metrics: dict[str, Any]) -> None:
        if self.opened:
            self.opened = False
            self.close(failed=False)

    def on_train_failed(self, step: int, error: BaseException) -> None:
        if self.opened:
            self.opened = False
            self.close(failed=True)


# -- TensorBoard ----------------------------------------------------------------------------------------------------

class TensorBoardOptions(Options):
    dir: OutputPath = Path("tensorboard")
    """Folder of the event files (relative: under output_dir)."""
    flush_seconds: float = Field(10.0, gt=0)
    """Write buffered events to disk at least this often."""

    @model_validator(mode="after")
    def _installed(self) -> TensorBoardOptions:
        _require("tensorboard", "tensorboard")
        return self


class TensorBoard(Tracker):
    """TensorBoard event files through torch's SummaryWriter."""

    Options = TensorBoardOptions

    def open(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = self.ctx.path(self.options.dir, f"{self.ctx.role}.dir")
        # a resumed run redoes the steps after its checkpoint: TensorBoard drops what earlier files hold for them
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=self.options.flush_seconds)

    def write(self, step: int, scalars: Scalars) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


# -- Weights & Biases -----------------------------------------------------------------------------------------------

class WandbOptions(Options):
    project: str = "jsarag"
    """The W&B project."""
    name: str | None = None
    """The run's display name (null: the output_dir's folder name)."""
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline: write the run to disk only (no account, no network; upload later with ``wandb sync``); online: stream
    it to the W&B server (needs ``wandb login``)."""
    dir: OutputPath = Path(".")
    """Where W&B writes its ``wandb/`` folder (relative: under output_dir)."""
    entity: str | None = None
    """The W&B user or team (null: the account's default)."""
    group: str | None = None
    """Group runs together (e.g. the seeds of one experiment)."""
    tags: list[str] = []
    """Tags of the run."""

    @model_validator(mode="after")
    def _installed(self) -> WandbOptions:
        _require("wandb", "wandb")
        return self


class Wandb(Tracker):
    """A Weights & Biases run, with the resolved recipe as its config; a resumed run continues the same run id."""

    Options = WandbOptions

    def open(self, start_step: int) -> None:
        import wandb

        folder = self.ctx.path(self.options.dir, f"{self.ctx.role}.dir")
        folder.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True, save_code=False)
        self.run = wandb.init(project=self.options.project, entity=self.options.entity, group=self.options.group,
                              name=self.options.name or self.ctx.output_dir.name, tags=self.options.tags,
                              mode=self.options.mode, dir=str(folder), id=self._run_id(folder, start_step),
                              resume="allow", config=self.ctx.recipe, settings=settings)

    def _run_id(self, folder: Path, start_step: int) -> str:
        """The run's W&B id: kept in <dir>/wandb-run-id so that a resumed run continues it (a new one afresh)."""
        stored = folder / "wandb-run-id"
        if start_step > 0 and stored.exists():
            return stored.read_text().strip()
        run_id = secrets.token_hex(4)  # W&B's own ids are 8 lowercase letters and digits too
        atomic_write(stored, run_id)
        return run_id

    def write(self, step: int, scalars: Scalars) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # before the process's os._exit, or the file holds nothing


# -- CSV ------------------------------------------------------------------------------------------------------------

class CsvOptions(Options):
    file: OutputPath = Path("scalars.csv")
    """The CSV file, rows ``step,time,tag,value`` (relative: under output_dir)."""


class Csv(Tracker):
    """Scalars as rows of a CSV file; a resumed run drops the rows of the steps it redoes."""

    Options = CsvOptions
    HEADER = ["step", "time", "tag", "value"]

    def open(self, start_step: int) -> None:
        self.path = self.ctx.path(self.options.file, f"{self.ctx.role}.file")
        kept = [row for row in self._rows() if int(row["step"]) <= start_step] if start_step else []
        text = io.StringIO()
        writer = csv.DictWriter(text, self.HEADER)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write(self.path, text.getvalue())
        self.stream = self.path.open("a", newline="")
        self.writer = csv.writer(self.stream)

    def _rows(self) -> list[dict[str, str]]:
        """The rows already in the file (none when there is no file; a row a kill tore is dropped)."""
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("value") not in (None, "")]

    def write(self, step: int, scalars: Scalars) -> None:
        now = round(time.time(), 3)
        self.writer.writerows([step, now, tag, repr(float(value))] for tag, value in scalars.items())
        self.stream.flush()

    def close(self, failed: bool) -> None:
        self.stream.close()


@hookimpl
def register_observers(register) -> None:
    register("tensorboard", TensorBoard)
    register("wandb", Wandb)
    register("csv", Csv)
