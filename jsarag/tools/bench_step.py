"""``jsarag bench step-cost``: what one training step costs under each estimator, measured in one interleaved run.

The recipe's models, data and hardware are built once, with a DeepSpeed engine over every trainable module. Each
round draws the next training batch and runs one full optimizer step (retrieve -> sample -> score -> update,
backward, step) per estimator on that same batch, in an order rotated every round so that none always goes first.
The defaults follow the paper's setting: ``jsa`` with m = 50 proposals over the prior's and the posterior's top-10
(``grad_pass: rescore``, and ``jsa_single`` with one gradient-carrying pass), ``rag`` with K = 10, ``vrag`` with
K = 10, and the floor ``supervised``: one generator pass per example, on its gold passage. Per estimator it reports:

- median seconds per optimizer step (after ``--warmup`` rounds), and the ratios to ``rag`` and to the floor;
- generator tokens per step: padded tokens through the generator, in all and in forwards that carry gradient;
- peak memory above the step's start: ``torch.cuda.max_memory_allocated`` on a GPU, else the peak resident set size
  of the process, sampled every 2 ms by a thread (``psutil``), after handing freed heap memory back to the OS.

    jsarag bench step-cost --config recipes/dialog_jsa.yaml --rounds 10
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psutil
import torch
from tqdm.auto import tqdm

from jsarag.api import Batch, Estimator
from jsarag.errors import RecipeError
from jsarag.plugins import Plugins
from jsarag.recipe import ComponentSpec, load_recipe
from jsarag.tools.diagnose import Study, estimator_options, parse_estimators, split_overrides

DEFAULT_ESTIMATORS = "jsa,jsa_single:jsa,rag,vrag,floor:supervised"
PAPER_SETTING = ["candidates.prior_top_k=10", "candidates.posterior_top_k=10", "candidates.mode=topk",
                 "train.grad_accum=1"]  # k_p = k_q = 10; one micro-batch per step
DEFAULT_OPTIONS = {"jsa": {"proposals": 50}, "jsa_single": {"proposals": 50, "grad_pass": "single"},
                   "vrag": {"top_k": 10}}  # by label; `LABEL.key=value` arguments override them


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jsarag bench step-cost``."""
    parser.add_argument("--config", type=Path, default=Path("recipes/dialog_jsa.yaml"), help="recipe: models, data")
    parser.add_argument("--estimators", default=DEFAULT_ESTIMATORS,
                        help="comma-separated; LABEL:NAME measures one twice, LABEL.key=value sets its options")
    parser.add_argument("--baseline", default="rag", help="label of the estimator the others' time is divided by")
    parser.add_argument("--floor", default="floor", help="label of the one-passage floor (× floor column)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (one step per estimator each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--out", type=Path, help="JSON report (default: <output_dir>/step_cost.json)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides and LABEL.key=value")


@dataclass
class Costs:
    """One estimator's measured steps."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    tokens_with_grad: list[int] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)
    stats: list[dict[str, float]] = field(default_factory=list)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; print the Markdown table and write the JSON report."""
    from jsarag.run import build_run

    plugins = Plugins()
    pairs = parse_estimators(args.estimators)
    recipe_overrides, given = split_overrides(args.overrides, [label for label, _ in pairs])
    recipe = load_recipe(args.config, [*PAPER_SETTING, *recipe_overrides], plugins)
    studies = [Study(label, name, estimator_options(name, label, {**DEFAULT_OPTIONS.get(label, {}), **given[label]},
                                                    recipe, plugins)) for label, name in pairs]
    if args.rounds < 1 or args.warmup < 0:
        raise RecipeError("--rounds must be >= 1 and --warmup >= 0")
    base = next((s for s in studies if plugins.component("estimator", s.name).cls.needs_posterior),
                studies[0])  # built with a posterior when any estimator needs one
    run = build_run(recipe.model_copy(update={"estimator": ComponentSpec(name=base.name, options=base.options)}))
    if run.ctx.world_size > 1:
        raise RecipeError("bench step-cost runs in one process: launch it without `deepspeed --num_gpus`")
    costs = measure(run, studies, args.rounds, args.warmup)
    report = summarise(run, studies, costs, args)
    path = args.out or recipe.output_dir / "step_cost.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwritten to {path}")
    return 0


def measure(run: Any, studies: list[Study], rounds: int, warmup: int) -> dict[str, Costs]:
    """Run ``warmup + rounds`` rounds of one optimizer step per estimator on a shared batch; keep the timed ones."""
    from jsarag.loop import LoopState, next_batch

    estimators = {s.label: run.new_estimator(s.name, s.options) for s in studies}
    costs = {s.label: Costs() for s in studies}
    state = LoopState()
    run.engine.train()
    for round_ in tqdm(range(warmup + rounds), desc="step-cost rounds", unit="round", mininterval=5):
        batch = next_batch(run, state)
        shift = round_ % len(studies)
        for study in studies[shift:] + studies[:shift]:
            figures = timed_step(run, estimators[study.label], study, batch)
            if round_ >= warmup:
                for name, value in figures.items():
                    getattr(costs[study.label], name).append(value)
    return costs


def timed_step(run: Any, estimator: Estimator, study: Study, batch: Batch) -> dict[str, Any]:
    """One optimizer step of ``estimator`` on ``batch``: its seconds, generator tokens, peak memory and stats."""
    from jsarag.loop import micro_step

    before = run.generator.tokens()
    with run.using(estimator=estimator):
        with peak_memory(run.ctx.device) as peak:
            started = time.perf_counter()
            _, result = run.engine(lambda: micro_step(run, batch))
            run.engine.backward(result.loss)
            run.engine.step()
            _synchronize(run.ctx.device)
            seconds = time.perf_counter() - started
    after = run.generator.tokens()
    return {"seconds": seconds, "tokens": after[0] - before[0], "tokens_with_grad": after[1] - before[1],
            "peak_mib": peak[0], "stats": result.stats}


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Yield a one-item list that holds, after the block, its peak memory above the start, in MiB."""
    box = [0.0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield box
        box[0] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    release_free_memory()
    process, done = psutil.Process(), threading.Event()
    start = peak = process.memory_info().rss

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield box
    finally:
        done.set()
        sampler.join()
        box[0] = (max(peak, process.memory_info().rss) - start) / 2**20


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so the next step's growth shows in the RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak above start then undercounts memory reused from the heap
        pass


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the report -----------------------------------------------------------------------------------------------------

def summarise(run: Any, studies: list[Study], costs: dict[str, Costs], args: argparse.Namespace) -> dict[str, Any]:
    """The JSON report: per estimator medians and ratios, the settings, the machine."""
    medians = {label: statistics.median(c.seconds) for label, c in costs.items()}
    labels = {s.label for s in studies}
    rag = args.baseline if args.baseline in labels else None
    floor = args.floor if args.floor in labels else None
    rows = {}
    for study in studies:
        c = costs[study.label]
        rows[study.label] = {
            "estimator": study.name, "options": study.options.model_dump(mode="json"),
            "median_s": medians[study.label], "min_s": min(c.seconds), "max_s": max(c.seconds),
            "vs_rag": medians[study.label] / medians[rag] if rag else None,
            "vs_floor": medians[study.label] / medians[floor] if floor else None,
            "tokens": statistics.mean(c.tokens), "tokens_with_grad": statistics.mean(c.tokens_with_grad),
            "peak_mib": statistics.median(c.peak_mib),
            "stats": {k: statistics.mean(s[k] for s in c.stats if k in s) for k in sorted({k for s in c.stats for k in s})},
        }
    recipe = run.recipe
    return {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(run.ctx.device),
        "command": "jsarag bench step-cost " + " ".join([f"--config {args.config}", f"--estimators {args.estimators}",
                                                         f"--rounds {args.rounds}", f"--warmup {args.warmup}",
                                                         *args.overrides]),
        "settings": {"generator": recipe.generator.options.model, "retriever": recipe.retriever.options.model,
                     "batch_size": recipe.train.batch_size, "rounds": args.rounds, "warmup": args.warmup,
                     "k_p": recipe.candidates.prior_top_k, "k_q": recipe.candidates.posterior_top_k,
                     "deepspeed": recipe.deepspeed.config, "memory": "peak above the step's start"},
        "estimators": rows,
    }


def machine(device: torch.device) -> str:
    """The hardware in words."""
    cpu = f"{psutil.cpu_count(logical=True)} CPU threads, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; {cpu}"
    return f"{platform.processor() or platform.machine()}, {cpu}, no GPU"


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table with the design goals checked."""
    s = report["settings"]
    lines = [f"Step cost on {report['machine']} ({report['date']}): {s['generator']}, batch {s['batch_size']}, "
             f"k_p = {s['k_p']}, k_q = {s['k_q']}, {s['deepspeed']}; median of {s['rounds']} interleaved rounds "
             f"after {s['warmup']} warm-up rounds.", "",
             "| estimator | s/step | × rag | × floor | generator tokens/step (with grad) | peak MiB | pairs scored |",
             "|---|---|---|---|---|---|---|"]
    for label, row in report["estimators"].items():
        ratio = [f"{row[k]:.2f}" if row[k] is not None else "n/a" for k in ("vs_rag", "vs_floor")]
        pairs = row["stats"].get("pairs_scored")
        lines.append(f"| {label} | {row['median_s']:.2f} | {ratio[0]} | {ratio[1]} | {row['tokens']:,.0f} "
                     f"({row['tokens_with_grad']:,.0f}) | {row['peak_mib']:.0f} | "
                     f"{'' if pairs is None else f'{pairs:.1f}'} |")
    for label, row in report["estimators"].items():
        if row["estimator"] == "jsa" and row["vs_rag"] is not None and row["vs_floor"] is not None:
            lines.append(f"\n- {label}: {row['vs_rag']:.2f} × rag (goal ≤ 0.6: {'met' if row['vs_rag'] <= 0.6 else 'not met'}), "
                         f"{row['vs_floor']:.2f} × floor (goal ≤ 2: {'met' if row['vs_floor'] <= 2 else 'not met'})")
    return "\n".join(lines)
