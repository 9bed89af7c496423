"""What a run reports: the table a finished run prints, and the Markdown of <output_dir>/report.md."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from jsarag.recipe import Recipe

LIKELIHOODS = {"sum": "log p(y|x,h) summed over the answer tokens",
               "mean": "log p(y|x,h) averaged per answer token (length-normalised)"}
SAMPLE_TEXT_CHARS = 240  # passage characters shown per retrieved passage


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


def delta_table(metrics: dict[str, Any]) -> str:
    """Return a Markdown table per split: each metric at the first and last evaluation and the change in points."""
    history = metrics["history"]
    if len(history) < 2:
        return "(one evaluation only: set `eval.at_start: true` to compare with the untrained models)"
    first, last = history[0], history[-1]
    lines = [f"| split | metric | step {first['step']} | step {last['step']} | change (points) |",
             "|---|---|---:|---:|---:|"]
    for split in (s for s in last if s != "step" and s in first):
        for name in (n for n in last[split] if n in first[split]):
            before, after = 100 * first[split][name], 100 * last[split][name]
            lines.append(f"| {split} | {name} | {before:.2f} | {after:.2f} | {after - before:+.2f} |")
    return "\n".join(lines)


def setup_lines(recipe: Recipe, world_size: int, nonfinite: int, counters: dict[str, dict[str, int]] | None = None
                ) -> list[str]:
    """Return the Markdown bullets that say how the numbers were obtained."""
    dropped = recipe.data.drop_unanswerable
    flag = f"`data.drop_unanswerable: {str(dropped).lower()}`"
    lines = [f"- CANNOTANSWER turns: {'dropped' if dropped else 'kept'} ({flag})"]
    likelihood = getattr(recipe.estimator.options, "likelihood", None)
    if likelihood is not None:
        lines.append(f"- generator likelihood: `{likelihood}`, {LIKELIHOODS.get(likelihood, likelihood)}")
    t = recipe.train
    lines.append(f"- batch: {t.batch_size} examples × {world_size} rank(s) × {t.grad_accum} micro-batch(es) per step")
    lines.append(f"- evaluation: first {recipe.eval.max_examples or 'all'} examples of each split, "
                 f"prior top-{recipe.eval.top_k}{'' if recipe.eval.generate else ', no decoding'}")
    if nonfinite:
        lines.append(f"- non-finite losses skipped: {nonfinite}")
    for kind, counts in (counters or {}).items():
        shown = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in counts.items() if value)
        if shown:
            lines.append(f"- {kind}: {shown}")
    return lines


def samples_section(split: str, step: int, samples: list[dict[str, Any]]) -> str:
    """Return Markdown for a few evaluated examples: question, reference, prediction, top passages."""
    parts = [f"### {split}, step {step}"]
    for i, s in enumerate(samples, 1):
        parts.append(f"**{i}. {s['question']}**  (`{s['id']}`)\n")
        parts.append(f"- reference: {s['answer']}")
        parts.append(f"- prediction: {s['prediction'] if s['prediction'] is not None else '(decoding off)'}")
        parts.append("- retrieved (prior top passages, ✓ = gold):")
        for j, p in enumerate(s["retrieved"], 1):
            text = p["text"] if len(p["text"]) <= SAMPLE_TEXT_CHARS else p["text"][:SAMPLE_TEXT_CHARS].rstrip() + "…"
            title = f"{p['title']}: " if p["title"] else ""
            parts.append(f"  {j}. `{p['id']}`{' ✓' if p['gold'] else ''} {title}{text}")
        parts.append("")
    return "\n".join(parts)


def render_report(recipe: Recipe, metrics: dict[str, Any], step: int, world_size: int,
                  samples: dict[str, tuple[int, list[dict[str, Any]]]], plots: list[str]) -> str:
    """Return the whole report.md of a run (plots are paths relative to the output folder)."""
    done = bool(metrics.get("final"))
    status = "finished" if done else f"stopped at step {step} (run the same command again to go on)"
    parts = [f"# jsarag run: {recipe.output_dir}", "",
             f"Estimator **{recipe.estimator.name}**, retriever **{recipe.retriever.name}**, generator "
             f"**{recipe.generator.name}**; {step} of {recipe.train.max_steps} steps, {status}.", "",
             "## Results", "", "Metrics in %, first to last evaluation:", "", delta_table(metrics), "",
             "Every evaluation:", "", metrics_table(metrics), "",
             "## Setup", "", *setup_lines(recipe, world_size, metrics.get("nonfinite_skipped", 0), metrics.get("counters")),
             ""]
    if plots:
        parts += ["## Curves", ""] + [f"![{Path(p).stem}]({p})\n" for p in plots]
    parts += ["## Samples", ""]
    parts += [samples_section(split, at, rows) for split, (at, rows) in samples.items()] or ["(no evaluation yet)", ""]
    parts += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe.source, sort_keys=False, allow_unicode=True).rstrip(),
              "```", ""]
    return "\n".join(parts)


def print_summary(metrics: dict[str, Any], output_dir: Path) -> None:
    """Print the evaluation table and where the run's files are."""
    print(metrics_table(metrics))
    print(f"metrics: {output_dir / 'metrics.json'}")
    if (output_dir / "report.md").exists():
        print(f"report:  {output_dir / 'report.md'}")
