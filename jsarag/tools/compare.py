"""``jsarag compare RUN_DIR ...``: several runs' final metrics side by side, as a Markdown table and a bar chart."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsarag.errors import JsaragError


@dataclass
class RunResult:
    """One run's last evaluation, by split."""

    label: str
    step: int
    finished: bool
    splits: dict[str, dict[str, float]]  # split -> metric -> value in [0, 1]


def load_result(folder: Path) -> RunResult:
    """Read a run folder's metrics.json; its final metrics, or the latest evaluation of an unfinished run."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise JsaragError(f"{folder}: no metrics.json here (not a jsarag run folder, or the run has not evaluated yet)")
    try:
        metrics: dict[str, Any] = json.loads(path.read_text())
        history = metrics["history"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise JsaragError(f"{path}: not a jsarag metrics file ({type(exc).__name__}: {exc})") from None
    if not history:
        raise JsaragError(f"{folder}: metrics.json has no evaluation yet")
    last = history[-1]
    splits = {k: v for k, v in last.items() if k != "step"}
    return RunResult(label=str(folder), step=last["step"], finished=bool(metrics.get("final")), splits=splits)


def comparison_table(results: list[RunResult]) -> str:
    """Return a Markdown table: one row per run (and split), metrics as percentages, the best of each in bold."""
    keys = [(r, split) for r in results for split in r.splits]
    names = list(dict.fromkeys(n for r, split in keys for n in r.splits[split]))
    best = _best(keys)
    lines = ["| run | step | split | " + " | ".join(names) + " |", "|---|---:|---|" + "---:|" * len(names)]
    for r, split in keys:
        cells = []
        for n in names:
            value = r.splits[split].get(n)
            text = "" if value is None else f"{100 * value:.2f}"
            cells.append(f"**{text}**" if value is not None and value == best.get((split, n)) else text)
        step = f"{r.step}" if r.finished else f"{r.step} (unfinished)"
        lines.append(f"| {r.label} | {step} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best(keys: list[tuple[RunResult, str]]) -> dict[tuple[str, str], float]:
    """Return the best value of each (split, metric) column where the runs differ (a tie has no winner)."""
    columns: dict[tuple[str, str], list[float]] = {}
    for r, split in keys:
        for n, value in r.splits[split].items():
            columns.setdefault((split, n), []).append(value)
    return {key: max(values) for key, values in columns.items() if min(values) < max(values)}


def compare(folders: list[Path], plot: Path | None = None) -> str:
    """Return the comparison table of run folders; with ``plot``, also draw the bar chart there."""
    results = [load_result(folder) for folder in folders]
    if plot is not None:
        from jsarag.tools.plots import metrics_bar_chart

        multi = len({split for r in results for split in r.splits}) > 1
        bars = {f"{r.label} {split}" if multi else r.label: values
                for r in results for split, values in r.splits.items()}
        metrics_bar_chart(plot, bars)
    note = "values in %, the best of each column in bold" if len(results) > 1 else "values in %"
    return f"{comparison_table(results)}\n\n({note})"
