"""PNG curves of a training run for the ``report`` observer: loss (each step and smoothed), the learning rate of
every parameter group, the estimator's statistics (JSA's acceptance rate, effective sample size, unique chain states)
and the evaluation metrics over optimizer steps, on integer step ticks (matplotlib's object-oriented API on the Agg
canvas: no display, no pyplot state). ``new_figure`` and ``save`` are shared with the plots of jsarag's tools."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Steps = list[dict[str, float]]  # one record per optimizer step: {"step": s, "loss": l, <estimator stats>}


def new_figure(width: float = 7.0, height: float = 3.6) -> Figure:
    """A figure drawn on the Agg canvas (no display, no pyplot state)."""
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever the default backend
    return figure


def save(figure: Figure, path: Path) -> Path:
    """Write a figure as PNG, creating its folder; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Mean of each value with up to ``window - 1`` values before it (same length as ``values``)."""
    sums = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def smoothing_window(n: int) -> int:
    """Steps averaged by the smoothed curve of ``n`` points: about a tenth of the run, at least 2 (1: too few to
    smooth)."""
    return 1 if n < 4 else max(2, min(100, n // 10))


def integer_steps(ax: Any) -> None:
    """Label the x axis with whole optimizer steps."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")


def step_plot(path: Path, steps: Steps, key: str, title: str, ylabel: str, unit_range: bool = False) -> Path:
    """Plot one per-step quantity (light) with its moving average (dark)."""
    points = [(r["step"], r[key]) for r in steps if key in r and np.isfinite(r[key])]
    x, y = [p[0] for p in points], [p[1] for p in points]
    window = smoothing_window(len(y))
    figure = new_figure()
    ax = figure.add_subplot()
    ax.plot(x, y, color="tab:blue", alpha=0.35 if window > 1 else 1.0, lw=1, label=f"{key}, each step",
            marker="." if len(y) < 30 else None)
    if window > 1:
        ax.plot(x, moving_average(y, window), color="tab:blue", lw=2, label=f"mean of the last {window} steps")
        ax.legend(loc="best", fontsize="small")
    if unit_range:
        ax.set_ylim(-0.02, 1.02)
    ax.set(title=title, ylabel=ylabel)
    integer_steps(ax)
    ax.grid(alpha=0.3)
    return save(figure, path)


def lines_plot(path: Path, steps: Steps, keys: list[str], title: str, ylabel: str) -> Path:
    """Plot several per-step quantities, one line each (the learning rate of each parameter group)."""
    figure = new_figure()
    ax = figure.add_subplot()
    for key in keys:
        points = [(r["step"], r[key]) for r in steps if key in r and np.isfinite(r[key])]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.5, label=key.split("/", 1)[-1],
                marker="." if len(points) < 30 else None)
    ax.set(title=title, ylabel=ylabel)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    integer_steps(ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return save(figure, path)


def eval_plot(path: Path, history: list[dict[str, Any]]) -> Path:
    """Plot every evaluation metric (in %) over steps: a row per split, retrieval and generation side by side."""
    splits = list(dict.fromkeys(k for record in history for k in record if k != "step"))
    figure = new_figure(width=10.0, height=3.2 * max(1, len(splits)))
    axes = figure.subplots(max(1, len(splits)), 2, squeeze=False)
    for row, split in zip(axes, splits):
        records = [r for r in history if split in r]
        names = list(dict.fromkeys(n for r in records for n in r[split]))
        groups = {"retrieval": [n for n in names if "@" in n], "generation": [n for n in names if "@" not in n]}
        for ax, (group, members) in zip(row, groups.items()):
            for name in members:
                points = [(r["step"], 100 * r[split][name]) for r in records if name in r[split]]
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            ax.set(title=f"{split}: {group}", ylabel="%")
            integer_steps(ax)
            top = max(1.0, ax.get_ylim()[1])  # all-zero metrics: keep a readable 0..1 % axis
            ax.set_ylim(-0.03 * top, top)
            ax.grid(alpha=0.3)
            if members:
                ax.legend(loc="best", fontsize="small")
            else:
                ax.set_axis_off()
    return save(figure, path)


ESTIMATOR_CURVES = {  # step statistic -> (file, title, y label, on a 0..1 axis)
    "acceptance": ("acceptance.png", "MIS acceptance rate", "accepted / moves", True),
    "ess": ("ess.png", "effective sample size of the chain weights", "ESS (states)", False),
    "unique_states": ("unique_states.png", "unique passages among the chain states", "states per example", False),
}


def training_plots(folder: Path, steps: Steps, history: list[dict[str, Any]]) -> list[Path]:
    """Write loss.png, learning_rate.png, the estimator's curves it reports (acceptance.png, ess.png,
    unique_states.png) and eval_metrics.png; return their paths."""
    written = []
    if steps:
        written.append(step_plot(folder / "loss.png", steps, "loss", "training loss", "loss"))
    rates = list(dict.fromkeys(k for r in steps for k in r if k.startswith("lr/")))
    if rates:
        written.append(lines_plot(folder / "learning_rate.png", steps, rates, "learning rate per parameter group",
                                  "learning rate"))
    for key, (name, title, ylabel, unit_range) in ESTIMATOR_CURVES.items():
        if any(key in r for r in steps):
            written.append(step_plot(folder / name, steps, key, title, ylabel, unit_range=unit_range))
    if history:
        written.append(eval_plot(folder / "eval_metrics.png", history))
    return written
