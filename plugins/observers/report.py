"""Observer ``report``: at the end of training, rank 0 writes <output_dir>/report.md (recipe, metrics first to last
with the change, setup notes, sample questions with retrieved passages and answers) and PNG curves in
<output_dir>/plots/ (loss, JSA acceptance rate, evaluation metrics)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from jsarag.api import Context, Observer, Options, atomic_write, hookimpl, metrics_table
from jsarag_plugins.observers.logging import read_records

Steps = list[dict[str, float]]  # one record per optimizer step: {"step": s, "loss": l, <estimator stats>}

LIKELIHOODS = {"sum": "log p(y|x,h) summed over the answer tokens",
               "mean": "log p(y|x,h) averaged per answer token (length-normalised)"}
SAMPLE_TEXT_CHARS = 240  # passage characters shown per retrieved passage


class Report(Observer):
    """Collect step records and evaluation samples; write report.md and plots when training ends."""

    def __init__(self, options: Options, ctx: Context) -> None:
        super().__init__(options, ctx)
        self.steps: Steps = []
        self.samples: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # split -> (step, first examples)

    def on_train_start(self, start_step: int, max_steps: int) -> None:
        """On resumption, take the earlier steps from train_log.jsonl (kept by ``jsonl_log``) when there is one."""
        log_file = self.ctx.output_dir / "train_log.jsonl"
        if self.ctx.is_main and start_step > 0 and log_file.exists():
            self.steps = [r for r in read_records(log_file) if "loss" in r and r["step"] <= start_step]

    def on_step_end(self, step: int, loss: float, stats: dict[str, float]) -> None:
        if self.ctx.is_main:
            self.steps.append({"step": step, "loss": loss, **stats})

    def on_eval_end(self, step: int, split: str, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        if self.ctx.is_main:
            self.samples[split] = (step, samples)

    def on_train_end(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        from jsarag_plugins.observers.plots import training_plots  # matplotlib: only when there is a report to draw

        out = self.ctx.output_dir
        plots = training_plots(out / "plots", self.steps, metrics["history"])
        recipe = self.ctx.recipe
        likelihood = recipe["estimator"]["options"].get("likelihood")
        text = render_report(recipe, self.ctx.recipe_source, likelihood, metrics, step, self.ctx.world_size,
                             self.samples, [str(p.relative_to(out)) for p in plots])
        atomic_write(out / "report.md", text)


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


def setup_lines(recipe: dict[str, Any], likelihood: str | None, world_size: int, nonfinite: int,
                counters: dict[str, dict[str, int]] | None = None) -> list[str]:
    """Return the Markdown bullets that say how the numbers were obtained (``recipe``: the resolved recipe)."""
    dropped = recipe["data"]["drop_unanswerable"]
    flag = f"`data.drop_unanswerable: {str(dropped).lower()}`"
    lines = [f"- CANNOTANSWER turns: {'dropped' if dropped else 'kept'} ({flag})"]
    if likelihood is not None:
        lines.append(f"- generator likelihood: `{likelihood}`, {LIKELIHOODS.get(likelihood, likelihood)}")
    t, e = recipe["train"], recipe["eval"]
    lines.append(f"- batch: {t['batch_size']} examples × {world_size} rank(s) × {t['grad_accum']} micro-batch(es) "
                 "per step")
    lines.append(f"- evaluation: first {e['max_examples'] or 'all'} examples of each split, "
                 f"prior top-{e['top_k']}{'' if e['generate'] else ', no decoding'}")
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


def _posterior(recipe: dict[str, Any]) -> str:
    """How the report names the posterior role (empty when the estimator trains none)."""
    if not recipe["posterior"]:
        return ""
    spec = recipe["posterior"]
    return "posterior the prior itself, " if spec["shares_prior"] else f"posterior **{spec['name']}**, "


def render_report(recipe: dict[str, Any], source: dict[str, Any], likelihood: str | None, metrics: dict[str, Any],
                  step: int, world_size: int, samples: dict[str, tuple[int, list[dict[str, Any]]]],
                  plots: list[str]) -> str:
    """Return the whole report.md of a run (``recipe`` resolved, ``source`` as written; plots relative paths)."""
    done = bool(metrics.get("final"))
    status = "finished" if done else f"stopped at step {step} (run the same command again to go on)"
    parts = [f"# jsarag run: {recipe['output_dir']}", "",
             f"Estimator **{recipe['estimator']['name']}**, prior **{recipe['retriever']['name']}**, "
             f"{_posterior(recipe)}generator **{recipe['generator']['name']}**; {step} of "
             f"{recipe['train']['max_steps']} steps, {status}.", "",
             "## Results", "", "Metrics in %, first to last evaluation:", "", delta_table(metrics), "",
             "Every evaluation:", "", metrics_table(metrics), "",
             "## Setup", "", *setup_lines(recipe, likelihood, world_size, metrics.get("nonfinite_skipped", 0),
                                          metrics.get("counters")),
             ""]
    if plots:
        parts += ["## Curves", ""] + [f"![{Path(p).stem}]({p})\n" for p in plots]
    parts += ["## Samples", ""]
    parts += [samples_section(split, at, rows) for split, (at, rows) in samples.items()] or ["(no evaluation yet)", ""]
    parts += ["## Recipe", "", "```yaml", yaml.safe_dump(source, sort_keys=False, allow_unicode=True).rstrip(),
              "```", ""]
    return "\n".join(parts)



@hookimpl
def register_observers(register) -> None:
    register("report", Report)
