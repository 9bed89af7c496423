"""Observer ``report``: at the end of training, rank 0 writes <output_dir>/report.md (recipe, metrics first to last
with the change, setup notes, sample questions with retrieved passages and answers) and PNG curves in
<output_dir>/plots/ (loss, JSA acceptance rate, evaluation metrics)."""
from __future__ import annotations

from typing import Any

from jsarag import hookimpl
from jsarag.checkpoint import atomic_write
from jsarag.components import Component, Options, RunContext
from jsarag.plots import Steps, training_plots
from jsarag.report import render_report
from jsarag_plugins.observers.logging import read_records


class Report(Component):
    """Collect step records and evaluation samples; write report.md and plots when training ends."""

    kind = "observer"

    def __init__(self, options: Options, ctx: RunContext) -> None:
        super().__init__(options, ctx)
        self.steps: Steps = []
        self.samples: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # split -> (step, first examples)

    @hookimpl
    def on_train_start(self, start_step: int) -> None:
        """On resumption, take the earlier steps from train_log.jsonl (kept by ``jsonl_log``) when there is one."""
        log_file = self.ctx.output_dir / "train_log.jsonl"
        if self.ctx.rank == 0 and start_step > 0 and log_file.exists():
            self.steps = [r for r in read_records(log_file) if "loss" in r and r["step"] <= start_step]

    @hookimpl
    def on_step_end(self, step: int, loss: float, stats: dict[str, float]) -> None:
        if self.ctx.rank == 0:
            self.steps.append({"step": step, "loss": loss, **stats})

    @hookimpl
    def on_eval_end(self, step: int, split: str, samples: list[dict[str, Any]]) -> None:
        if self.ctx.rank == 0:
            self.samples[split] = (step, samples)

    @hookimpl
    def on_train_end(self, step: int, metrics: dict[str, Any]) -> None:
        if self.ctx.rank != 0:
            return
        out = self.ctx.output_dir
        plots = training_plots(out / "plots", self.steps, metrics["history"])
        text = render_report(self.ctx.recipe, metrics, step, self.ctx.world_size, self.samples,
                             [str(p.relative_to(out)) for p in plots])
        atomic_write(out / "report.md", text)


@hookimpl
def register_observers(register) -> None:
    register("report", Report)
