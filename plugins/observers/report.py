"""Observer ``report``: at the end of training (or when a signal stops it), rank 0 writes <output_dir>/report.md
(when, how long, which jsarag version and commit; metrics before and after training with the change; setup notes;
every session of the run with the recipe keys changed at each resume; sample questions with retrieved passages and
answers; the recipe as written and resolved with every default) and PNG curves in <output_dir>/plots/ (loss,
learning rates, JSA's acceptance rate, ESS and unique states, evaluation metrics)."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from jsarag.api import Context, Observer, Options, atomic_write, hookimpl, metrics_table, shorten
from jsarag_plugins.observers.logging import read_records

Steps = list[dict[str, float]]  # one record per optimizer step: {"step": s, "loss": l, <estimator stats>}

LIKELIHOODS = {"sum": "log p(y|x,h) summed over the answer tokens",
               "mean": "log p(y|x,h) averaged per answer token (length-normalised)"}
SAMPLE_TEXT_CHARS = 240  # passage characters shown per retrieved passage
SAMPLE_QA_CHARS = 400  # characters of a question, reference or prediction shown (the JSONL files keep them whole)


class Report(Observer):
    """Collect step records and evaluation samples; write report.md and plots when training ends."""

    def __init__(self, options: Options, ctx: Context) -> None:
        super().__init__(options, ctx)
        self.steps: Steps = []
        self.samples: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # split -> (step, first examples)
        self.step_seconds: list[float] = []  # this session's steps, evaluations left out
        self.last = time.perf_counter()

    def on_train_start(self, start_step: int, max_steps: int) -> None:
        """On resumption, take the earlier steps from train_log.jsonl (kept by ``jsonl_log``) when there is one."""
        log_file = self.ctx.output_dir / "train_log.jsonl"
        if self.ctx.is_main and start_step > 0 and log_file.exists():
            self.steps = [r for r in read_records(log_file) if "loss" in r and r["step"] <= start_step]
        self.last = time.perf_counter()

    def on_step_end(self, step: int, loss: float, stats: dict[str, float]) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self.last)
        self.last = now
        if self.ctx.is_main:
            self.steps.append({"step": step, "loss": loss, **stats})

    def on_eval_end(self, step: int, split: str, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        self.last = time.perf_counter()  # the next step's time leaves the evaluation out
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
        timing = statistics.median(self.step_seconds) if self.step_seconds else None
        text = render_report(recipe, self.ctx.recipe_source, likelihood, metrics, step, self.ctx.world_size,
                             self.samples, [str(p.relative_to(out)) for p in plots], self.ctx.sessions, timing)
        atomic_write(out / "report.md", text)


def delta_table(metrics: dict[str, Any]) -> str:
    """Return a Markdown table per split: each metric before and after training (the first and the last evaluation)
    and the change in points."""
    history = metrics["history"]
    if len(history) < 2:
        return "(one evaluation only: set `eval.at_start: true` to compare with the untrained models)"
    first, last = history[0], history[-1]
    before = "before training" if first["step"] == 0 else "first evaluation"
    after = "after training" if metrics.get("final") else "latest evaluation"
    lines = [f"| split | metric | {before} (step {first['step']}) | {after} (step {last['step']}) | change (points) |",
             "|---|---|---:|---:|---:|"]
    for split in (s for s in last if s != "step" and s in first):
        for name in (n for n in last[split] if n in first[split]):
            old, new = 100 * first[split][name], 100 * last[split][name]
            lines.append(f"| {split} | {name} | {old:.2f} | {new:.2f} | {new - old:+.2f} |")
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
    clamped = (counters or {}).get("clamped_to_kb", {})
    top_k = f"{clamped['eval.top_k']} (eval.top_k {e['top_k']} is more than the KB holds)" if "eval.top_k" in clamped \
        else e["top_k"]
    lines.append(f"- evaluation: first {e['max_examples'] or 'all'} examples of each split, "
                 f"prior top-{top_k}{'' if e['generate'] else ', no decoding'}")
    if nonfinite:
        lines.append(f"- non-finite losses skipped: {nonfinite}")
    for key, used in clamped.items():
        if key != "eval.top_k":
            lines.append(f"- `{key}`: {recipe_value(recipe, key)} is more than the KB's {used} passages: {used} used")
    for kind, counts in (counters or {}).items():
        shown = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in counts.items() if value)
        if shown and kind != "clamped_to_kb":
            lines.append(f"- {kind}: {shown}")
    return lines


def recipe_value(recipe: dict[str, Any], key: str) -> Any:
    """The value of a dotted key of the resolved recipe (``candidates.prior_top_k``)."""
    value: Any = recipe
    for part in key.split("."):
        value = value[part]
    return value


def run_lines(sessions: list[dict[str, Any]], step_seconds: float | None) -> list[str]:
    """Return the Markdown bullets saying when the run was made, with what, and how long it took."""
    if not sessions:
        return [f"- {step_seconds:.2f} s/step (median, evaluations left out)"] if step_seconds else []
    last = sessions[-1]
    commit = last.get("commit") or "not a git checkout"
    total = sum(s.get("seconds", 0.0) for s in sessions)
    these = f" in {len(sessions)} sessions (this one: {_duration(last.get('seconds', 0.0))})" if len(sessions) > 1 \
        else ""
    pace = f"; {step_seconds:.2f} s/step (median of this session's steps, evaluations left out)" if step_seconds \
        else ""
    return [f"- date: {last['started']}; jsarag {last.get('version') or '(not installed)'}, commit {commit}; "
            f"host {last.get('host')}, {last.get('ranks')} rank(s)",
            f"- wall time: {_duration(total)}{these}{pace}"]


def sessions_table(sessions: list[dict[str, Any]]) -> str:
    """Return a Markdown table of the run's sessions (the first start, then each resume) with the recipe keys
    changed at each resume."""
    lines = ["| session | started | steps | wall time | ended | jsarag, commit | recipe changed at the resume |",
             "|---:|---|---|---:|---|---|---|"]
    for number, s in enumerate(sessions, 1):
        changes = "; ".join(f"`{key}` {_value(a)} → {_value(b)}" for key, (a, b) in s.get("changes", {}).items())
        ended = "killed (no clean stop) after its last checkpoint" if s["ended"] == "running" and number < len(
            sessions) else s["ended"]
        lines.append(f"| {number} | {s['started']} | {s['start_step']} → {s['end_step']} | "
                     f"{_duration(s.get('seconds', 0.0))} | {ended} | {s.get('version')}, {s.get('commit')} | "
                     f"{changes or '—'} |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _value(value: Any) -> str:
    return shorten(json.dumps(value, ensure_ascii=False), 60).replace("|", "\\|")


def samples_section(split: str, step: int, samples: list[dict[str, Any]]) -> str:
    """Return Markdown for a few evaluated examples: question, reference, prediction, top passages."""
    parts = [f"### {split}, step {step}"]
    for i, s in enumerate(samples, 1):
        prediction = _line(s["prediction"], SAMPLE_QA_CHARS) if s["prediction"] is not None else "(decoding off)"
        parts.append(f"**{i}. {_line(s['question'], SAMPLE_QA_CHARS)}**  (`{_line(s['id'], 80)}`)\n")
        parts.append(f"- reference: {_line(s['answer'], SAMPLE_QA_CHARS)}")
        parts.append(f"- prediction: {prediction or '(empty)'}")
        parts.append("- retrieved (prior top passages, ✓ = gold):")
        for j, p in enumerate(s["retrieved"], 1):
            title = f"{_line(p['title'], 80)}: " if p["title"] else ""
            parts.append(f"  {j}. `{_line(p['id'], 80)}`{' ✓' if p['gold'] else ''} {title}"
                         f"{_line(p['text'], SAMPLE_TEXT_CHARS)}")
        parts.append("")
    return "\n".join(parts)


def _line(text: str, limit: int) -> str:
    """A text on one line, shortened to ``limit`` characters."""
    return shorten(" ".join(text.split()), limit)


def _posterior(recipe: dict[str, Any]) -> str:
    """How the report names the posterior role (empty when the estimator trains none)."""
    if not recipe["posterior"]:
        return ""
    spec = recipe["posterior"]
    return "posterior the prior itself, " if spec["shares_prior"] else f"posterior **{spec['name']}**, "


def render_report(recipe: dict[str, Any], source: dict[str, Any], likelihood: str | None, metrics: dict[str, Any],
                  step: int, world_size: int, samples: dict[str, tuple[int, list[dict[str, Any]]]],
                  plots: list[str], sessions: list[dict[str, Any]] = (), step_seconds: float | None = None) -> str:
    """Return the whole report.md of a run (``recipe`` resolved, ``source`` as written; plots relative paths;
    ``sessions`` as ``Context.sessions``; ``step_seconds`` the median step time of this session)."""
    done = bool(metrics.get("final"))
    ended = sessions[-1]["ended"] if sessions else ""
    status = "finished" if done else f"{ended or 'stopped'} at step {step} (run the same command again to go on)"
    parts = [f"# jsarag run: {recipe['output_dir']}", "",
             f"Estimator **{recipe['estimator']['name']}**, prior **{recipe['retriever']['name']}**, "
             f"{_posterior(recipe)}generator **{recipe['generator']['name']}**; {step} of "
             f"{recipe['train']['max_steps']} steps, {status}.", "", *run_lines(list(sessions), step_seconds), "",
             "## Results", "", "Metrics in %, before and after training (the first and the last evaluation):", "",
             delta_table(metrics), "", "Every evaluation:", "", metrics_table(metrics), "",
             "## Setup", "", *setup_lines(recipe, likelihood, world_size, metrics.get("nonfinite_skipped", 0),
                                          metrics.get("counters")),
             ""]
    if len(sessions) > 1:
        parts += ["## Sessions", "", "Each start of the run (the first, then every resume):", "",
                  sessions_table(list(sessions)), ""]
    if plots:
        parts += ["## Curves", ""] + [f"![{Path(p).stem}]({p})\n" for p in plots]
    parts += ["## Samples", ""]
    parts += [samples_section(split, at, rows) for split, (at, rows) in samples.items()] or ["(no evaluation yet)", ""]
    parts += ["## Recipe", "", "As written (merged with its `extends` and the command-line overrides):", "",
              "```yaml", yaml.safe_dump(source, sort_keys=False, allow_unicode=True).rstrip(), "```", "",
              "Resolved, with every default:", "",
              "```yaml", yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    return "\n".join(parts)


@hookimpl
def register_observers(register) -> None:
    register("report", Report)
