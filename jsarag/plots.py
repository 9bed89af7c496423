"""PNG figures of runs (matplotlib's object-oriented API on the Agg canvas: no display, no pyplot state).

- ``training_plots``: loss, the JSA acceptance rate and evaluation metrics over optimizer steps;
- ``metrics_bar_chart``: several runs' final metrics side by side (``jsarag compare --plot``);
- ``quality_bar_chart``: estimators' metrics over seeds, mean with the spread as error bars (``jsarag bench quality``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Steps = list[dict[str, float]]  # one record per optimizer step: {"step": s, "loss": l, <estimator stats>}


def _figure(width: float = 7.0, height: float = 3.6) -> Figure:
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever the default backend
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Mean of each value with up to ``window - 1`` values before it (same length as ``values``)."""
    sums = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def step_plot(path: Path, steps: Steps, key: str, title: str, ylabel: str, unit_range: bool = False) -> Path:
    """Plot one per-step quantity (light) with its moving average (dark)."""
    points = [(r["step"], r[key]) for r in steps if key in r and np.isfinite(r[key])]
    x, y = [p[0] for p in points], [p[1] for p in points]
    window = max(1, min(100, len(y) // 10))  # smoothing: about a tenth of the run
    figure = _figure()
    ax = figure.add_subplot()
    ax.plot(x, y, color="tab:blue", alpha=0.35 if window > 1 else 1.0, lw=1, label=key,
            marker="." if len(y) < 30 else None)
    if window > 1:
        ax.plot(x, moving_average(y, window), color="tab:blue", lw=2, label=f"mean of last {window} steps")
        ax.legend(loc="best", fontsize="small")
    if unit_range:
        ax.set_ylim(-0.02, 1.02)
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def eval_plot(path: Path, history: list[dict[str, Any]]) -> Path:
    """Plot every evaluation metric (in %) over steps: a row per split, retrieval and generation side by side."""
    splits = list(dict.fromkeys(k for record in history for k in record if k != "step"))
    figure = _figure(width=10.0, height=3.2 * max(1, len(splits)))
    axes = figure.subplots(max(1, len(splits)), 2, squeeze=False)
    for row, split in zip(axes, splits):
        records = [r for r in history if split in r]
        names = list(dict.fromkeys(n for r in records for n in r[split]))
        groups = {"retrieval": [n for n in names if "@" in n], "generation": [n for n in names if "@" not in n]}
        for ax, (group, members) in zip(row, groups.items()):
            for name in members:
                points = [(r["step"], 100 * r[split][name]) for r in records if name in r[split]]
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            ax.set(title=f"{split}: {group}", xlabel="optimizer step", ylabel="%")
            top = max(1.0, ax.get_ylim()[1])  # all-zero metrics: keep a readable 0..1 % axis
            ax.set_ylim(-0.03 * top, top)
            ax.grid(alpha=0.3)
            if members:
                ax.legend(loc="best", fontsize="small")
            else:
                ax.set_axis_off()
    return _save(figure, path)


def training_plots(folder: Path, steps: Steps, history: list[dict[str, Any]]) -> list[Path]:
    """Write loss.png, acceptance.png (when the estimator reports it) and eval_metrics.png; return their paths."""
    written = []
    if steps:
        written.append(step_plot(folder / "loss.png", steps, "loss", "training loss", "loss"))
    if any("acceptance" in r for r in steps):
        written.append(step_plot(folder / "acceptance.png", steps, "acceptance", "MIS acceptance rate",
                                 "accepted / moves", unit_range=True))
    if history:
        written.append(eval_plot(folder / "eval_metrics.png", history))
    return written


def metrics_bar_chart(path: Path, table: dict[str, dict[str, float]]) -> Path:
    """Grouped bars: one group per metric, one bar per run (values in [0, 1], drawn as %)."""
    names = list(dict.fromkeys(n for values in table.values() for n in values))
    width = 0.8 / max(1, len(table))
    figure = _figure(width=min(14.0, max(6.0, 0.45 * len(names) * len(table) + 3.0)), height=4.2)
    ax = figure.add_subplot()
    for i, (run, values) in enumerate(table.items()):
        x = np.arange(len(names)) + (i - (len(table) - 1) / 2) * width
        bars = ax.bar(x, [100 * values.get(n, np.nan) for n in names], width, label=run)
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=1)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(ylabel="%", title="final metrics", ylim=(0, 108))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=min(3, len(table)), fontsize="small")
    return _save(figure, path)


def quality_bar_chart(path: Path, panels: dict[str, dict[str, dict[str, tuple[float, float | None]]]]) -> Path:
    """Draw a row per dataset: bars grouped by metric, one per estimator, mean with ±std error bars (as %)."""
    figure = _figure(width=10.0, height=3.4 * max(1, len(panels)))
    for ax, (dataset, table) in zip(figure.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0], panels.items()):
        names = list(dict.fromkeys(n for values in table.values() for n in values))
        width = 0.8 / max(1, len(table))
        for i, (label, values) in enumerate(table.items()):
            x = np.arange(len(names)) + (i - (len(table) - 1) / 2) * width
            means = [100 * values[n][0] if n in values else np.nan for n in names]
            stds = [100 * (values[n][1] or 0.0) if n in values else 0.0 for n in names]
            bars = ax.bar(x, means, width, yerr=stds, capsize=2, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=1)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set(ylabel="%", title=dataset, ylim=(0, 120))  # room above 100 % for the legend
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper right", ncols=len(table), fontsize="small")
    return _save(figure, path)


def gradient_sweep_plots(prefix: Path, report: dict[str, Any]) -> list[Path]:
    """Per trainable module, each estimator's mean gradient norm and relative variance over training steps, with the
    exact gradient's norm for reference (``jsarag diagnose grad-variance --checkpoints``): <prefix>_norms.png and
    <prefix>_variance.png."""
    steps = report["steps"]
    x = [entry["step"] for entry in steps]
    labels = list(steps[0]["estimators"])
    groups = [g for g in steps[0]["exact_norms"]]
    paths = []
    for what, key, ylabel in (("norms", "grad_norm_mean", "mean ‖g‖ over draws"),
                              ("variance", "relative_variance", "E‖g − E g‖² / ‖g_exact‖²")):
        figure = _figure(width=4.0 * len(groups), height=3.4)
        for ax, group in zip(figure.subplots(1, len(groups), squeeze=False)[0], groups):
            for label in labels:
                values = [entry["estimators"][label]["groups"][group] for entry in steps]
                y = [v[key] if v["trained"] else np.nan for v in values]
                ax.plot(x, y, marker="o", lw=1.5, label=label)
            if what == "norms":
                ax.plot(x, [entry["exact_norms"][group] for entry in steps], "k--", lw=1, label="exact ‖g‖")
            ax.set_yscale("log")
            ax.set(title=group, xlabel="training step", ylabel=ylabel)
            ax.grid(alpha=0.3)
        figure.axes[0].legend(fontsize="small")
        paths.append(_save(figure, Path(f"{prefix}_{what}.png")))
    return paths
