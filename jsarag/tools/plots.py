"""PNG figures of jsarag's tools (matplotlib on the Agg canvas):

- ``metrics_bar_chart``: several runs' final metrics side by side (``jsarag compare --plot``);
- ``quality_bar_chart``: estimators' metrics over seeds, mean with the spread as error bars (``jsarag bench quality``);
- ``gradient_sweep_plots``: estimators' gradient norms and variances over a run's checkpoints (``jsarag diagnose``);
- ``curve_bands``: metrics over training steps per estimator, mean with ±std bands (``jsarag bench estimators``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jsarag_plugins.observers.plots import new_figure, save


def metrics_bar_chart(path: Path, table: dict[str, dict[str, float]]) -> Path:
    """Grouped bars: one group per metric, one bar per run (values in [0, 1], drawn as %)."""
    names = list(dict.fromkeys(n for values in table.values() for n in values))
    width = 0.8 / max(1, len(table))
    figure = new_figure(width=min(14.0, max(6.0, 0.45 * len(names) * len(table) + 3.0)), height=4.2)
    ax = figure.add_subplot()
    for i, (run, values) in enumerate(table.items()):
        x = np.arange(len(names)) + (i - (len(table) - 1) / 2) * width
        bars = ax.bar(x, [100 * values.get(n, np.nan) for n in names], width, label=run)
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=1)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(ylabel="%", title="final metrics", ylim=(0, 108))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=min(3, len(table)), fontsize="small")
    return save(figure, path)


def quality_bar_chart(path: Path, panels: dict[str, dict[str, dict[str, tuple[float, float | None]]]]) -> Path:
    """Draw a row per dataset: bars grouped by metric, one per estimator, mean with ±std error bars (as %)."""
    figure = new_figure(width=10.0, height=3.4 * max(1, len(panels)))
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
    return save(figure, path)


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
        figure = new_figure(width=4.0 * len(groups), height=3.4)
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
        paths.append(save(figure, Path(f"{prefix}_{what}.png")))
    return paths


def curve_bands(path: Path, panels: dict[str, dict[str, dict[int, tuple[float, float]]]], xlabel: str) -> Path:
    """One panel per metric: a line per estimator through its (mean, std) by step, ±std shaded (values drawn as %)."""
    figure = new_figure(width=5.2 * max(1, len(panels)), height=4.0)
    for ax, (title, lines) in zip(figure.subplots(1, max(1, len(panels)), squeeze=False)[0], panels.items()):
        for label, points in lines.items():
            x = sorted(points)
            mean = np.array([100 * points[s][0] for s in x])
            std = np.array([100 * points[s][1] for s in x])
            (line,) = ax.plot(x, mean, lw=1.6, label=label)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
        ax.set(title=title, xlabel=xlabel, ylabel="%", ylim=(-2, 102))
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize="small")
    return save(figure, path)
