"""The table a finished run prints (and report.md shows): every evaluation of metrics.json, metrics in %; and
``shorten``, which cuts long texts in what reports and commands print."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def metrics_table(metrics: dict[str, Any]) -> str:
    """Return a Markdown table with one row per (evaluation step, split), metrics as percentages."""
    rows = [(record["step"], split, values) for record in metrics["history"]
            for split, values in record.items() if split != "step"]
    if not rows:
        return "(no evaluation)"
    names = list(dict.fromkeys(name for _, _, values in rows for name in values))
    lines = ["| step | split | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for step, split, values in rows:
        cells = [f"{100 * values[n]:.2f}" if n in values else "" for n in names]
        lines.append(f"| {step} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_summary(metrics: dict[str, Any], output_dir: Path) -> None:
    """Print the evaluation table and where the run's files are."""
    print(metrics_table(metrics))
    print(f"metrics: {output_dir / 'metrics.json'}")
    if (output_dir / "report.md").exists():
        print(f"report:  {output_dir / 'report.md'}")


def shorten(text: str, limit: int = 300) -> str:
    """Return ``text`` cut to ``limit`` characters, saying how many were left out (for reports and command output;
    the JSONL files keep every text whole)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit].rstrip()}… (+{len(text) - limit:,} characters)"
