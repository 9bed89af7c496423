"""``jsarag bench quality``: train each estimator alike on each dataset and seed, and score it on held-out data.

Every (dataset, estimator, seed) is one ordinary training run, started in a subprocess exactly as a user starts one
(``python -m jsarag train --config <config> <overrides>``), into ``<out>/<dataset>/<estimator>/seed<k>``. All runs share
the config's models and knobs and the command's ``key=value`` overrides; per run the bench sets only the output
folder, ``data.dir``, the evaluation split (``test`` where the folder has one, else ``dev``), ``train.seed`` and the
estimator section. An estimator's options are the config's when the config names that estimator, else the plugin's
defaults, with ``likelihood`` copied from the config's estimator (all score answers alike), and ``LABEL.key=value``
options on top.

Each run folder keeps ``bench_quality.json`` (the run's merged recipe and its wall time) and ``bench_train.log`` (the
run's output). A finished run (``metrics.json`` with a ``final`` entry) is reused; an unfinished one resumes through
the recipe's ``resume: auto``; a folder made with other settings is an error, never silently mixed in.

    jsarag bench quality --datasets doqa=,squad=squad_v1.1 --seeds 0,1,2 train.max_steps=200

Writes ``<out>/quality.json`` (every run, the mean and sample standard deviation over seeds, the paired bootstrap
intervals below, the machine and the command), ``<out>/quality.md`` (a table per dataset) and ``<out>/quality.png``;
prints the Markdown.

**Is a gain real?** Per dataset and metric, the difference of ``--treatment`` (jsa) minus the best other estimator
(the one with the best mean over seeds for that metric), with a 95% paired bootstrap interval over the evaluation
examples: every run scores the same examples (its predictions file), each estimator's per-example scores are
averaged over its seeds, and ``--resamples`` resamplings of the examples (the same for every estimator: paired)
give the percentile interval of the difference. Example-averaged metrics (Recall@k, MRR, EM, F1, ROUGE-L) are
resampled as per-example scores; corpus BLEU from per-example n-gram counts (summed, then BLEU's formula, the
computation of jsarag.metrics). An interval that excludes 0 is a difference the examples support at the 5% level;
it does not cover what another draw of the training data or of more seeds would do beyond the seeds run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jsarag.data import EMBEDDED_DATASETS, default_data_dir, is_file
from jsarag.errors import DataError, JsaragError, RecipeError, TrainingError
from jsarag.paths import climbs, plain_name

if TYPE_CHECKING:  # torch and pydantic load only when the command runs, not whenever `jsarag` builds its parser
    from jsarag.plugins import Plugins
    from jsarag.recipe import Recipe

RECORD = "bench_quality.json"  # in each run folder: the run's merged recipe and its wall time
LOG = "bench_train.log"  # in each run folder: the training subprocess's stdout and stderr
OWNED = ("output_dir", "data.dir", "data.eval_splits", "train.seed", "estimator")  # keys the bench sets per run
TAIL_LINES = 40  # lines of a failed run's output printed


@dataclass(frozen=True)
class Dataset:
    """One data folder of the bench: its name (a folder of --out), its path (None = embedded DoQA), its eval split."""

    name: str
    dir: Path | None
    split: str


@dataclass
class Job:
    """One training run of the bench and the outcome read from its folder."""

    dataset: Dataset
    label: str
    seed: int
    output_dir: Path
    overrides: list[str]
    recipe: Recipe
    reused: bool = False
    wall_s: float | None = None
    step: int = 0
    examples: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``jsarag bench quality`` to its parser."""
    parser.add_argument("--config", type=Path, default=Path("dialog_jsa"),
                        help="recipe with the models and knobs shared by every run (its estimator is replaced)")
    parser.add_argument("--estimators", default="rag,vrag,jsa",
                        help="comma-separated estimator names; LABEL:NAME runs one twice, LABEL.key=value sets options")
    parser.add_argument("--datasets", default="doqa=",
                        help="comma-separated NAME=DATA_DIR; DATA_DIR empty is the embedded DoQA cooking, and "
                             "doqa_cooking or squad_v1.1 (no such folder here) the embedded dataset of that name, "
                             "e.g. doqa=,squad=squad_v1.1")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values")
    parser.add_argument("--treatment", default="jsa",
                        help="label compared with the best other estimator (paired bootstrap interval per metric)")
    parser.add_argument("--resamples", type=int, default=10000, help="bootstrap resamplings of the examples")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_quality"), help="folder of the runs and results")
    parser.add_argument("--num-gpus", type=int, default=0,
                        help="launch each run under `deepspeed --num_gpus N` (0: one plain process)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides for every run, e.g. train.max_steps=100 eval.max_examples=200")


def main(args: argparse.Namespace) -> int:
    """Plan every run (validating its recipe), train or reuse each, then write and print the results."""
    jobs, settings = plan(args)
    out = _writable_out(args.out)
    for position, job in enumerate(jobs, 1):
        run_job(job, f"[{position}/{len(jobs)}]", args.config, args.num_gpus)
    report = build_report(jobs, settings)
    report["significance"] = significance(jobs, args.treatment, args.resamples)
    markdown = render_markdown(report)
    write_text(out / "quality.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text(out / "quality.md", markdown + "\n")
    draw_chart(out / "quality.png", report)
    print(f"\n{markdown}\n\nwritten: {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'}")
    return 0


# -- planning -------------------------------------------------------------------------------------------------------

def plan(args: argparse.Namespace) -> tuple[list[Job], dict[str, Any]]:
    """Plan every run (its overrides and validated recipe) by dataset, estimator, seed; return them and the settings."""
    if args.num_gpus < 0:
        raise RecipeError(f"--num-gpus {args.num_gpus}: give 0 (one process) or a number of GPUs")
    from jsarag.plugins import Plugins
    from jsarag.recipe import load_recipe
    from jsarag.tools.diagnose import parse_estimators, split_overrides

    plugins = Plugins()
    pairs = parse_estimators(args.estimators)
    for label, _ in pairs:
        _plain("--estimators", label)
    recipe_overrides, given = split_overrides(args.overrides, [label for label, _ in pairs])
    check_owned(recipe_overrides)
    check_labels(recipe_overrides, set(plugins.registry()["estimator"]))
    shared = ["eval.at_start=false", *recipe_overrides]
    base = load_recipe(args.config, shared, plugins)
    estimators = {label: (name, estimator_values(name, label, given[label], base, plugins)) for label, name in pairs}
    datasets, seeds = parse_datasets(args.datasets), parse_seeds(args.seeds)
    out = args.out.absolute() if climbs(args.out) else args.out  # a relative output_dir may not climb with '..'
    jobs = []
    for dataset in datasets:
        for label, (name, values) in estimators.items():
            for seed in seeds:
                folder = out / dataset.name / label / f"seed{seed}"
                overrides = shared + run_overrides(folder, dataset, seed, name, values)
                jobs.append(Job(dataset, label, seed, folder, overrides, load_recipe(args.config, overrides, plugins)))
    settings = {"config": str(args.config), "overrides": recipe_overrides, "seeds": seeds, "num_gpus": args.num_gpus,
                "estimators": {label: {"name": name, "options": opts} for label, (name, opts) in estimators.items()},
                "datasets": {d.name: {"dir": str(d.dir) if d.dir else None, "split": d.split} for d in datasets},
                "train": {"max_steps": base.train.max_steps, "batch_size": base.train.batch_size,
                          "grad_accum": base.train.grad_accum},
                "eval": {"max_examples": base.eval.max_examples, "top_k": base.eval.top_k}}
    return jobs, settings


def check_owned(overrides: list[str]) -> None:
    """Refuse a recipe override of a key the bench sets per run, naming the option that sets it."""
    options = {"output_dir": "--out", "data.dir": "--datasets", "data.eval_splits": "--datasets (test, else dev)",
               "train.seed": "--seeds", "estimator": "--estimators and LABEL.key=value"}
    for item in overrides:
        key = item.partition("=")[0].strip()
        for owned in OWNED:
            if key == owned or key.startswith(owned + "."):
                raise RecipeError(f"override '{item}': the bench sets {owned} per run; use {options[owned]}")


def check_labels(overrides: list[str], estimators: set[str]) -> None:
    """Refuse ``NAME.key=value`` for an estimator that is not among --estimators (it is no recipe key)."""
    from jsarag.recipe import Recipe

    for item in overrides:
        head = item.partition("=")[0].strip().partition(".")[0]
        if head in estimators and head not in Recipe.model_fields:
            raise RecipeError(f"option '{item}': '{head}' is not among --estimators; add it there or drop the option")


def estimator_values(name: str, label: str, given: dict[str, Any], recipe: Recipe, plugins: Plugins
                     ) -> dict[str, Any]:
    """Return an estimator's validated options as JSON values."""
    from jsarag.tools.diagnose import estimator_options

    return estimator_options(name, label, given, recipe, plugins).model_dump(mode="json")


def run_overrides(folder: Path, dataset: Dataset, seed: int, name: str, values: dict[str, Any]) -> list[str]:
    """Return the overrides one run adds to the shared ones: folder, data, split, seed, estimator (JSON-quoted)."""
    data_dir = json.dumps(str(dataset.dir)) if dataset.dir else "null"
    return [f"output_dir={json.dumps(str(folder))}", f"data.dir={data_dir}",
            f"data.eval_splits=[{json.dumps(dataset.split)}]", f"train.seed={seed}", f"estimator.name={name}",
            *(f"estimator.{key}={json.dumps(value)}" for key, value in values.items())]


def parse_datasets(text: str) -> list[Dataset]:
    """Split ``doqa=,squad=DIR`` into datasets, each with its evaluation split (test where present, else dev)."""
    datasets: list[Dataset] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, path = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise RecipeError(f"--datasets: '{item}' must be NAME=DATA_DIR (an empty DATA_DIR is the embedded DoQA)")
        _plain("--datasets", name)
        if any(d.name == name for d in datasets):
            raise RecipeError(f"--datasets: the name '{name}' appears twice")
        folder = Path(path) if path else None
        if path in EMBEDDED_DATASETS and not Path(path).exists():
            folder = default_data_dir(path)  # an embedded dataset by name
        datasets.append(Dataset(name, folder, eval_split(folder or default_data_dir(), f"--datasets {name}")))
    if not datasets:
        raise RecipeError("--datasets: name at least one, e.g. --datasets doqa=")
    return datasets


def eval_split(folder: Path, where: str) -> str:
    """Return ``test`` when the data folder has that split, else ``dev``; raise a DataError when it has neither."""
    if not folder.is_dir():
        raise DataError(f"{where}: the data folder {folder} does not exist")
    for split in ("test", "dev"):
        if any(is_file(folder / f"{split}.jsonl{ext}") for ext in ("", ".gz")):
            return split
    raise DataError(f"{where}: {folder} has neither a test nor a dev split (test.jsonl, dev.jsonl[.gz])")


def parse_seeds(text: str) -> list[int]:
    """Split ``0,1,2`` into distinct integer seeds."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RecipeError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise RecipeError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


def _plain(option: str, name: str) -> None:
    """Refuse a label that cannot be a folder name."""
    try:
        plain_name(name)
    except RecipeError:
        raise RecipeError(f"{option}: '{name}' names a folder of --out; use letters, digits, _ . -") from None


def _writable_out(out: Path) -> Path:
    """Create ``--out``; a path that is not a folder is an error naming it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JsaragError(f"--out {out}: cannot create this folder ({exc.strerror or exc})") from None
    return out


# -- running --------------------------------------------------------------------------------------------------------

def run_job(job: Job, position: str, config: Path, num_gpus: int) -> None:
    """Reuse a finished run or train it (resuming an unfinished one); fill the job's outcome from its folder."""
    title = f"{position} {job.dataset.name} / {job.label} / seed {job.seed}"
    record = read_record(job)
    if record is not None and finished(job.output_dir):
        job.reused, job.wall_s = True, record.get("wall_s")
        read_outcome(job)
        print(f"{title}: reused (finished earlier), {_headline(job)}", flush=True)
        return
    print(f"{title}: training into {job.output_dir} ... ", end="", flush=True)
    wall = (record or {}).get("wall_s") or 0.0
    write_record(job, wall)
    started = time.perf_counter()
    try:
        code = launch(job, config, num_gpus)
    finally:
        job.wall_s = wall + time.perf_counter() - started
        write_record(job, job.wall_s)
    if code != 0 or not finished(job.output_dir):
        print("failed", flush=True)
        fail(job, code)
    read_outcome(job)
    print(f"{job.wall_s:.0f} s, {_headline(job)}", flush=True)


def read_record(job: Job) -> dict[str, Any] | None:
    """Return the run folder's record (None for a new folder); refuse a folder of other settings or another tool."""
    path = job.output_dir / RECORD
    if not path.is_file():
        if job.output_dir.exists() and any(job.output_dir.iterdir()):
            raise JsaragError(f"{job.output_dir}: holds files the bench did not write (no {RECORD}); remove the "
                              "folder or choose another --out")
        return None
    try:
        record = json.loads(path.read_text())
        recorded = record["recipe"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise JsaragError(f"{path}: unreadable ({type(exc).__name__}: {exc}); remove the folder to redo it") from None
    changed = changed_keys(recorded, _plain_json(job.recipe.source))
    if changed:
        raise JsaragError(f"{job.output_dir}: trained with other settings ({', '.join(changed[:8])} differ); remove "
                          "the folder to redo it or choose another --out")
    return record


def write_record(job: Job, wall_s: float) -> None:
    """Write the run folder's record: its merged recipe, the command that trains it and its wall seconds so far."""
    record = {"recipe": _plain_json(job.recipe.source), "overrides": job.overrides, "wall_s": wall_s}
    write_text(job.output_dir / RECORD, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Return the dotted keys whose values differ between two recipe dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".") or "recipe"]


def write_text(path: Path, text: str) -> None:
    """Write a file atomically (readers see the old content or the new)."""
    from jsarag.files import atomic_write

    atomic_write(path, text)


def _plain_json(value: Any) -> Any:
    """Return a recipe dict as JSON gives it back (so a stored record compares equal to a fresh one)."""
    return json.loads(json.dumps(value, default=str))


def finished(folder: Path) -> bool:
    """Tell whether a run folder's metrics.json has a non-empty ``final`` entry."""
    try:
        return bool(json.loads((folder / "metrics.json").read_text()).get("final"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def launch(job: Job, config: Path, num_gpus: int) -> int:
    """Run ``jsarag train`` for one job as a user would, its output appended to the run's log; return its exit code."""
    command = [sys.executable, "-m", "jsarag", "train", "--config", str(config), *job.overrides]
    if num_gpus:
        launcher = shutil.which("deepspeed") or "deepspeed"
        command = [launcher, "--num_gpus", str(num_gpus), "--master_port", str(_free_port()), "--module", "jsarag",
                   "train", "--config", str(config), *job.overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (job.output_dir / LOG).open("a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode


def fail(job: Job, code: int) -> None:
    """Print the last lines of a failed run's output and raise a TrainingError naming the run and its log."""
    log = job.output_dir / LOG
    lines = log.read_text(errors="replace").splitlines()[-TAIL_LINES:] if log.is_file() else []
    print("\n".join(f"  | {line}" for line in lines), file=sys.stderr, flush=True)
    why = f"exited {code}" if code else "exited 0 before its last step (train.stop_at?), no final metrics"
    raise TrainingError(f"the run {job.label} on {job.dataset.name} with seed {job.seed} {why}; its output is in "
                        f"{log} (last lines above). Fix the cause and run the same command again: finished runs are "
                        "reused, this one resumes")


def _free_port() -> int:
    """Pick a free local port for the DeepSpeed launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_outcome(job: Job) -> None:
    """Fill a job's final metrics, step and number of scored examples from its run folder."""
    metrics = json.loads((job.output_dir / "metrics.json").read_text())
    split = job.dataset.split
    if split not in metrics["final"]:
        raise JsaragError(f"{job.output_dir / 'metrics.json'}: no final metrics for the split '{split}'")
    job.metrics = metrics["final"][split]
    job.step = metrics["history"][-1]["step"]
    predictions = job.output_dir / "predictions" / f"{split}-step{job.step:07d}.jsonl"
    job.examples = sum(1 for line in predictions.open() if line.strip()) if predictions.is_file() else None


def _headline(job: Job) -> str:
    """Summarise a finished run in a few words for its progress line."""
    return ", ".join(f"{name} {100 * job.metrics[name]:.1f}" for name in ("recall@1", "f1") if name in job.metrics)


# -- the report -----------------------------------------------------------------------------------------------------

def metric_names() -> tuple[str, ...]:
    """Return the metrics reported in table order: retrieval (Recall@1/10, MRR@10), then generation (EM ...)."""
    from jsarag.metrics import GENERATION_METRICS, RETRIEVAL_METRICS

    return RETRIEVAL_METRICS + GENERATION_METRICS


def spread(values: list[float]) -> dict[str, Any]:
    """Return the mean and sample standard deviation (None for one value) of values over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def aggregate(jobs: list[Job]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Return, per dataset and estimator, the mean and spread over seeds of each metric and of the wall seconds."""
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for job in jobs:
        out.setdefault(job.dataset.name, {}).setdefault(job.label, {})
    for dataset, estimators in out.items():
        for label in estimators:
            runs = [j for j in jobs if j.dataset.name == dataset and j.label == label]
            for name in metric_names():
                values = [j.metrics[name] for j in runs if name in j.metrics]
                if values:
                    estimators[label][name] = spread(values)
            walls = [j.wall_s for j in runs if j.wall_s is not None]
            if walls:
                estimators[label]["wall_s"] = spread(walls)
    return out


def machine() -> dict[str, Any]:
    """Describe the machine the bench ran on: platform, Python, CPU count, torch and the GPU's name if any."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if gpus else None, "gpus": gpus}


def build_report(jobs: list[Job], settings: dict[str, Any]) -> dict[str, Any]:
    """Return the content of quality.json: when, where, how, every run and the aggregates."""
    runs = [{"dataset": j.dataset.name, "estimator": j.label, "seed": j.seed, "split": j.dataset.split,
             "output_dir": str(j.output_dir), "step": j.step, "examples": j.examples, "wall_s": j.wall_s,
             "reused": j.reused, "metrics": j.metrics} for j in jobs]
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
            "command": shlex.join(["jsarag", *sys.argv[1:]]), "cwd": os.getcwd(), "settings": settings,
            "runs": runs, "aggregates": aggregate(jobs)}


def render_markdown(report: dict[str, Any]) -> str:
    """Render quality.md: how it was run, then one table per dataset (estimators × metrics, mean ± std in %)."""
    s, m = report["settings"], report["machine"]
    where = f"{m['platform']}, {m['cpus']} CPUs" + (f", {m['gpus']} × {m['gpu']}" if m["gpu"] else ", no GPU")
    estimators = "; ".join(f"`{label}`: {e['name']} `{json.dumps(e['options'])}`"
                           for label, e in s["estimators"].items())
    parts = ["# Answer and retrieval quality by estimator", "",
             f"{report['date']} on {where}. Command: `{report['command']}`", "",
             f"Config `{s['config']}`; estimators {estimators}.", ""]
    for dataset, estimators_table in report["aggregates"].items():
        runs = [r for r in report["runs"] if r["dataset"] == dataset]
        parts += [f"## {dataset}", "", _dataset_line(dataset, runs, s), "", _table(estimators_table), ""]
        gains = report.get("significance", {}).get(dataset)
        if gains:
            parts += [gains_table(gains), ""]
    parts += ["![quality](quality.png)", ""]
    return "\n".join(parts).rstrip()


def _dataset_line(dataset: str, runs: list[dict[str, Any]], s: dict[str, Any]) -> str:
    """Return the line under a dataset's heading: data, split, examples, steps, seeds."""
    info, t = s["datasets"][dataset], s["train"]
    counts = sorted({r["examples"] for r in runs if r["examples"] is not None})
    examples = "?" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    seeds = s["seeds"]
    spread_text = f"mean ± sample std over {len(seeds)} seeds" if len(seeds) > 1 else "1 seed: no spread"
    ranks = max(1, s["num_gpus"])
    return (f"Data `{info['dir'] or 'embedded DoQA cooking'}`, `{info['split']}` split, {examples} examples scored; "
            f"{t['max_steps']} step(s) of {t['batch_size']} examples × {t['grad_accum']} micro-batch(es) × {ranks} "
            f"rank(s); seeds {', '.join(map(str, seeds))} ({spread_text}). Metrics in %, the best mean of each column "
            "in bold; wall seconds per run (loading, training and evaluation).")


def _table(estimators: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Return a Markdown table: a row per estimator, mean ± std cells, the best mean per metric in bold."""
    present = {n for cells in estimators.values() for n in cells}
    names = [n for n in metric_names() if n in present]
    best = {}
    for n in names:
        means = [cells[n]["mean"] for cells in estimators.values() if n in cells]
        if len(means) > 1 and min(means) < max(means):
            best[n] = max(means)
    lines = ["| estimator | " + " | ".join(names) + " | wall s |", "|---|" + "---:|" * (len(names) + 1)]
    for label, cells in estimators.items():
        row = []
        for n in names:
            text = _cell(cells.get(n), 100.0, 2)
            row.append(f"**{text}**" if n in cells and cells[n]["mean"] == best.get(n) else text)
        lines.append(f"| {label} | " + " | ".join(row) + f" | {_cell(cells.get('wall_s'), 1.0, 0)} |")
    return "\n".join(lines)


def _cell(value: dict[str, Any] | None, scale: float, digits: int) -> str:
    """Format a cell as ``mean ± std`` (just the mean for one seed; empty when missing)."""
    if value is None:
        return ""
    text = f"{scale * value['mean']:.{digits}f}"
    return text if value["std"] is None else f"{text} ± {scale * value['std']:.{digits}f}"


def draw_chart(path: Path, report: dict[str, Any]) -> Path:
    """Draw quality.png: per dataset, each metric's mean per estimator as a bar, the spread as error bars."""
    from jsarag.tools.plots import quality_bar_chart

    panels = {dataset: {label: {n: (v["mean"], v["std"]) for n, v in cells.items() if n != "wall_s"}
                        for label, cells in estimators.items()}
              for dataset, estimators in report["aggregates"].items()}
    return quality_bar_chart(path, panels)


# -- is a gain real: paired bootstrap over the evaluation examples ---------------------------------------------------

BLEU_ORDERS = {"bleu1": 1, "bleu4": 4}


@dataclass
class ExampleScores:
    """One run's scores of each evaluation example: per-example values of the example-averaged metrics, and BLEU's
    per-example counts (clipped matches and candidate n-grams for n = 1..4, prediction and closest reference length)."""

    ids: list[str]
    values: dict[str, Any]  # metric -> (n,) float array
    bleu: Any  # (n, 10) float array: matches 1-4, candidates 1-4, prediction length, reference length


def example_scores(job: Job) -> ExampleScores:
    """Score every example of a finished run's final predictions file against its split's references."""
    import numpy as np

    from jsarag.data import load_examples
    from jsarag.metrics import generation_metrics, retrieval_metrics

    recipe, split = job.recipe, job.dataset.split
    path = job.output_dir / "predictions" / f"{split}-step{job.step:07d}.jsonl"
    rows = [json.loads(line) for line in path.open() if line.strip()]
    examples = load_examples(recipe.data.split_source(split), None, drop_unanswerable=recipe.data.drop_unanswerable,
                             on_error=recipe.data.on_error)
    if [ex.id for ex in examples[:len(rows)]] != [r["id"] for r in rows]:
        raise JsaragError(f"{path}: its example ids are not the first {len(rows)} of the {split} split in order")
    names = ("recall@1", "recall@10", "mrr@10", "em", "f1", "rougeL")
    values: dict[str, list[float]] = {n: [] for n in names}
    for row, ex in zip(rows, examples):
        scores = {**retrieval_metrics([row["ranked"]], [list(ex.gold_passage_ids)]),
                  **generation_metrics([row["prediction"]], [list(ex.answers)])}
        for n in names:
            values[n].append(scores[n])
    bleu = np.array([bleu_counts(row["prediction"], list(ex.answers)) for row, ex in zip(rows, examples)])
    return ExampleScores([r["id"] for r in rows], {n: np.array(v) for n, v in values.items()}, bleu)


def bleu_counts(prediction: str, references: list[str]) -> list[float]:
    """BLEU's counts for one example, as torchmetrics counts them (whitespace tokens, clipped n-gram matches against
    the union of the references, the reference length closest to the prediction's, the first on ties)."""
    pred = prediction.split() if prediction else []
    refs = [r.split() if r else [] for r in references]
    pred_ngrams, ref_ngrams = _ngrams(pred), Counter()
    for ref in refs:
        ref_ngrams |= _ngrams(ref)
    matches, totals = [0.0] * 4, [0.0] * 4
    for gram, count in (pred_ngrams & ref_ngrams).items():
        matches[len(gram) - 1] += count
    for gram, count in pred_ngrams.items():
        totals[len(gram) - 1] += count
    lengths = [len(r) for r in refs]
    closest = lengths[min(range(len(lengths)), key=lambda i: abs(len(pred) - lengths[i]))]
    return [*matches, *totals, float(len(pred)), float(closest)]


def _ngrams(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[j:j + i]) for i in range(1, 5) for j in range(len(tokens) - i + 1))


def corpus_bleu(counts, order: int):
    """(R,) corpus BLEU-``order`` of R resampled corpora from their summed counts (R, 10); 0 where a precision is 0."""
    import numpy as np

    matches, totals = counts[:, :order], counts[:, 4:4 + order]
    pred_len, ref_len = counts[:, 8], counts[:, 9]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_precision = np.log(matches / totals).mean(-1)
        penalty = np.where(pred_len > ref_len, 1.0, np.exp(1 - ref_len / pred_len))
        bleu = penalty * np.exp(log_precision)
    return np.where((matches > 0).all(-1), bleu, 0.0)


def resampled_metric(scores: ExampleScores, metric: str, weights):
    """(R,) a metric over R resampled evaluation sets, given as (R, n) counts of how often each example is drawn."""
    if metric in BLEU_ORDERS:
        return corpus_bleu(weights @ scores.bleu, BLEU_ORDERS[metric])
    return weights @ scores.values[metric] / weights.sum(-1)


def significance(jobs: list[Job], treatment: str, resamples: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per dataset and metric: treatment minus the best other estimator, with a 95% paired bootstrap interval."""
    out: dict[str, dict[str, Any]] = {}
    for dataset in dict.fromkeys(j.dataset.name for j in jobs):
        mine = [j for j in jobs if j.dataset.name == dataset]
        labels = list(dict.fromkeys(j.label for j in mine))
        if treatment in labels and len(labels) > 1:
            scores = {label: [example_scores(j) for j in mine if j.label == label] for label in labels}
            out[dataset] = paired_bootstrap(scores, treatment, resamples, seed, dataset)
    return out


def paired_bootstrap(scores: dict[str, list[ExampleScores]], treatment: str, resamples: int, seed: int = 0,
                     dataset: str = "") -> dict[str, Any]:
    """Per metric: the treatment's seed-averaged metric minus the best other estimator's, and the 2.5 and 97.5
    percentiles of that difference over resamplings of the examples drawn once for all estimators (paired)."""
    import numpy as np

    ids = scores[treatment][0].ids
    if any(s.ids != ids for runs in scores.values() for s in runs):
        raise JsaragError(f"bench quality: the runs on {dataset} scored different examples; cannot pair them")
    n = len(ids)
    rng = np.random.default_rng(seed)
    weights = np.vstack([np.ones(n), rng.multinomial(n, [1.0 / n] * n, size=resamples)])  # row 0: the data itself
    out = {}
    for metric in metric_names():
        means = {label: np.mean([resampled_metric(s, metric, weights) for s in runs], axis=0)
                 for label, runs in scores.items()}  # (1 + R,) the seed-averaged metric of each resampling
        best = max((label for label in scores if label != treatment), key=lambda label: means[label][0])
        diff = means[treatment] - means[best]
        low, high = np.percentile(diff[1:], [2.5, 97.5])
        out[metric] = {"treatment": treatment, "baseline": best, "diff": float(diff[0]), "ci95": [float(low),
                       float(high)], "examples": n, "resamples": resamples, "seeds": len(scores[treatment]),
                       "excludes_zero": bool(low > 0 or high < 0)}
    return out


def gains_table(gains: dict[str, dict[str, Any]]) -> str:
    """A Markdown row per metric: treatment minus the best baseline, in points, with its 95% interval."""
    first = next(iter(gains.values()))
    lines = [f"`{first['treatment']}` minus the best other estimator per metric, in points, with a 95% paired "
             f"bootstrap interval over the {first['examples']} examples ({first['resamples']} resamplings; each "
             f"estimator's {first['seeds']} seed(s) averaged per example); **bold**: the interval excludes 0.", "",
             "| metric | best other | difference | 95% interval |", "|---|---|---:|---:|"]
    for metric, g in gains.items():
        diff = f"{100 * g['diff']:+.2f}"
        interval = f"[{100 * g['ci95'][0]:+.2f}, {100 * g['ci95'][1]:+.2f}]"
        if g["excludes_zero"]:
            diff, interval = f"**{diff}**", f"**{interval}**"
        lines.append(f"| {metric} | `{g['baseline']}` | {diff} | {interval} |")
    return "\n".join(lines)
