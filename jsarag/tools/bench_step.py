"""``jsarag bench step-cost``: what one training step costs under each estimator, measured in one interleaved run.

The recipe's models, data and hardware are built once, with a DeepSpeed engine over every trainable module. Each
round draws the next training batch and runs one full optimizer step (retrieve -> sample -> score -> update,
backward, step; with learning rate 0, so that every step sees the same weights) per estimator on that same batch,
in an order rotated every round so that none always goes first.
The defaults follow the paper's setting (``--setting paper``): ``jsa`` with m = 50 proposals over the prior's and
the posterior's top-10 (``grad_pass: rescore``), the same without each of the generator's savings (``jsa_noreuse``:
the rescore runs the whole model; ``jsa_noshare``: no shared prompt prefix; ``jsa_plain``: neither, nor inference
mode: how jsa ran before them), ``jsa_single`` with one gradient-carrying pass, ``rag`` with K = 10, ``vrag`` with
K = 10, and the floor ``supervised``: one generator pass per example, on its gold passage. ``--setting recipe``
keeps the recipe's own candidates and estimator options instead. Per estimator it reports:

- median seconds per optimizer step (after ``--warmup`` rounds), and the ratios to ``rag`` and to the floor;
- generator tokens per step: padded tokens through the generator, in all and in forwards that carry gradient, and
  tokens per second;
- peak memory above the step's start: ``torch.cuda.max_memory_allocated`` on a GPU, else the peak resident set size
  of the process, sampled every 2 ms by a thread (``psutil``), after handing freed heap memory back to the OS.

With ``--checkpoints RUN_DIR`` the same is measured at the models as built (step 0) and at every complete checkpoint
of that run (ZeRO 0-2: its weights, the estimator state of the run's own estimator, and the next batches the run
would have drawn), and averaged over those steps: the posterior sharpens as it trains, so step 0 is jsa's worst.

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
from pydantic import ValidationError
from tqdm.auto import tqdm

from jsarag.api import Batch, Estimator, Options
from jsarag.errors import RecipeError
from jsarag.plugins import Plugins
from jsarag.recipe import ComponentSpec, load_recipe
from jsarag.tools.diagnose import (
    Study,
    checkpoint_tags,
    estimator_options,
    load_weights,
    parse_estimators,
    split_overrides,
)

DEFAULT_ESTIMATORS = ("jsa,jsa_noreuse:jsa,jsa_noshare:jsa,jsa_plain:jsa,jsa_single:jsa,rag,vrag,"
                      "floor:supervised")
PAPER_SETTING = ["candidates.prior_top_k=10", "candidates.posterior_top_k=10", "candidates.mode=topk",
                 "train.grad_accum=1"]  # k_p = k_q = 10; one micro-batch per step
ONE_STEP = ["train.grad_accum=1"]  # --setting recipe: the recipe's candidates, one micro-batch per step
PLAIN = {"generator.reuse_frozen_layers": False, "generator.share_prefix": False, "generator.inference_mode": False}
PAPER_OPTIONS = {"jsa": {"proposals": 50}, "vrag": {"top_k": 10}}  # by estimator; `LABEL.key=value` overrides
SAVINGS = {"jsa_noreuse": {"generator.reuse_frozen_layers": False}, "jsa_noshare": {"generator.share_prefix": False},
           "jsa_plain": PLAIN, "jsa_single": {"grad_pass": "single"}}  # in both settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jsarag bench step-cost``."""
    parser.add_argument("--config", type=Path, default=Path("dialog_jsa"), help="recipe: models, data")
    parser.add_argument("--estimators", default=DEFAULT_ESTIMATORS,
                        help="comma-separated; LABEL:NAME measures one twice, LABEL.key=value sets its options, "
                        "LABEL.generator.key=value the generator's scoring options for its steps")
    parser.add_argument("--baseline", default="rag", help="label of the estimator the others' time is divided by")
    parser.add_argument("--floor", default="floor", help="label of the one-passage floor (× floor column)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (one step per estimator each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--setting", choices=["paper", "recipe"], default="paper",
                        help="paper: k_p = k_q = 10, m = 50, K = 10; recipe: the recipe's own candidates and options")
    parser.add_argument("--checkpoints", type=Path, help="a run's output_dir: measure at step 0 and at each of its "
                        "checkpoints, and average over them")
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
    """Run the benchmark; print the Markdown table(s) and write the JSON report."""
    from jsarag.run import build_run

    plugins = Plugins()
    pairs = parse_estimators(args.estimators)
    recipe_overrides, given = split_overrides(args.overrides, [label for label, _ in pairs])
    setting = PAPER_SETTING if args.setting == "paper" else ONE_STEP
    recipe = load_recipe(args.config, [*setting, *recipe_overrides], plugins)
    paper = PAPER_OPTIONS if args.setting == "paper" else {}
    chosen = {label: {**paper.get(name, {}), **SAVINGS.get(label, {}), **given[label]} for label, name in pairs}
    scoring = {label: {k.removeprefix("generator."): v for k, v in options.items() if k.startswith("generator.")}
               for label, options in chosen.items()}
    studies = [Study(label, name, estimator_options(name, label, {k: v for k, v in chosen[label].items()
                                                                   if not k.startswith("generator.")}, recipe, plugins))
               for label, name in pairs]
    if args.rounds < 1 or args.warmup < 0:
        raise RecipeError("--rounds must be >= 1 and --warmup >= 0")
    sweep = checkpoint_tags(args.checkpoints) if args.checkpoints is not None else []
    base = next((s for s in studies if plugins.component("estimator", s.name).cls.needs_posterior),
                studies[0])  # built with a posterior when any estimator needs one
    run = build_run(recipe.model_copy(update={"estimator": ComponentSpec(name=base.name, options=base.options)}))
    if run.ctx.world_size > 1:
        raise RecipeError("bench step-cost runs in one process: launch it without `deepspeed --num_gpus`")
    generator_options = {label: _scoring_options(run, label, values) for label, values in scoring.items()}
    initial = {k: v.detach().clone() for k, v in run.engine.module.state_dict().items()} if sweep else None
    steps = []
    for step, folder in [(0, None), *sweep]:
        estimators = {s.label: run.new_estimator(s.name, s.options) for s in studies}
        state = resume_point(run, folder, initial, estimators, studies, recipe.estimator.name)
        costs, positions = measure(run, studies, estimators, generator_options, args.rounds, args.warmup, state)
        steps.append({"step": step, "checkpoint": str(folder) if folder else None, "batches": positions,
                      **summarise(run, studies, costs, args, generator_options)})
    report = steps[0] if not sweep else {**{k: v for k, v in steps[0].items() if k != "estimators"},
                                         "steps": steps, "average": average(steps, args)}
    path = args.out or recipe.output_dir / "step_cost.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if not sweep:
        print(markdown(report))
    else:
        for entry in steps:
            print(f"### step {entry['step']}\n\n{markdown(entry)}\n")
        print(f"### average over steps {', '.join(str(e['step']) for e in steps)}\n\n"
              f"{markdown({**report, 'estimators': report['average']})}")
    print(f"\nwritten to {path}")
    return 0


def _scoring_options(run: Any, label: str, values: dict[str, Any]) -> Options | None:
    """The generator's options for one study's steps (None: the recipe's), validated by its schema."""
    if not values:
        return None
    schema = type(run.generator.options)
    try:
        return schema.model_validate({**run.generator.options.model_dump(), **values})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join([label, "generator", *map(str, err["loc"])])
        raise RecipeError(f"{key}: {err['msg']}, got {err.get('input')!r}") from None


def resume_point(run: Any, folder: Path | None, initial: dict[str, torch.Tensor] | None,
                 estimators: dict[str, Estimator], studies: list[Study], trained_with: str) -> Any:
    """Load a checkpoint's weights (or the initial ones, in a sweep) and return the loop state its next batches
    come from; the run's own estimator's saved state goes to every study of that estimator."""
    from jsarag.checkpoint import load_loop_state
    from jsarag.loop import LoopState

    if initial is not None:
        load_weights(run.engine.module, folder, initial)
    if folder is None:
        return LoopState()
    saved = load_loop_state(folder.parent, folder.name, 0)
    for study in studies:
        if study.name == trained_with:
            estimators[study.label].load_state_dict(saved["components"].get("estimator", {}))
    return LoopState(**saved["loop"])


def measure(run: Any, studies: list[Study], estimators: dict[str, Estimator], generator_options: dict[str, Any],
            rounds: int, warmup: int, state: Any) -> tuple[dict[str, Costs], list[list[int]]]:
    """Run ``warmup + rounds`` rounds of one optimizer step per estimator on a shared batch; keep the timed ones
    and return them with the timed batches' positions in the training split."""
    from jsarag.loop import next_batch

    costs = {s.label: Costs() for s in studies}
    positions = []
    run.engine.train()
    for round_ in tqdm(range(warmup + rounds), desc="step-cost rounds", unit="round", mininterval=5):
        batch = next_batch(run, state)
        if round_ >= warmup:
            positions.append(list(batch.positions))
        shift = round_ % len(studies)
        for study in studies[shift:] + studies[:shift]:
            with scoring_options(run, generator_options[study.label]):
                figures = timed_step(run, estimators[study.label], study, batch)
            if round_ >= warmup:
                for name, value in figures.items():
                    getattr(costs[study.label], name).append(value)
    return costs, positions


@contextmanager
def scoring_options(run: Any, options: Options | None) -> Iterator[None]:
    """Let the generator score with ``options`` for the block (only options it reads when scoring take effect)."""
    if options is None:
        yield
        return
    saved, run.generator.options = run.generator.options, options
    try:
        yield
    finally:
        run.generator.options = saved


def timed_step(run: Any, estimator: Estimator, study: Study, batch: Batch) -> dict[str, Any]:
    """One optimizer step of ``estimator`` on ``batch``: its seconds, generator tokens, peak memory and stats."""
    from jsarag.loop import micro_step

    before = run.generator.tokens()
    with run.using(estimator=estimator):
        with peak_memory(run.ctx.device) as peak:
            started = time.perf_counter()
            _, result = run.engine(lambda: micro_step(run, batch))
            run.engine.backward(result.loss)
            for group in run.engine.optimizer.param_groups:  # the same work, but every step sees the same weights
                group["lr"] = 0.0
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

def summarise(run: Any, studies: list[Study], costs: dict[str, Costs], args: argparse.Namespace,
              generator_options: dict[str, Options | None]) -> dict[str, Any]:
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
            "generator_options": _changed(run, generator_options[study.label]),
            "median_s": medians[study.label], "min_s": min(c.seconds), "max_s": max(c.seconds),
            "vs_rag": medians[study.label] / medians[rag] if rag else None,
            "vs_floor": medians[study.label] / medians[floor] if floor else None,
            "tokens": statistics.mean(c.tokens), "tokens_with_grad": statistics.mean(c.tokens_with_grad),
            "tokens_per_s": statistics.mean(c.tokens) / medians[study.label],
            "peak_mib": statistics.median(c.peak_mib),
            "stats": {k: statistics.mean(s[k] for s in c.stats if k in s) for k in sorted({k for s in c.stats for k in s})},
        }
    recipe = run.recipe
    return {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(run.ctx.device),
        "command": "jsarag bench step-cost " + " ".join([
            f"--config {args.config}", f"--estimators {args.estimators}", f"--setting {args.setting}",
            f"--rounds {args.rounds}", f"--warmup {args.warmup}",
            *([f"--checkpoints {args.checkpoints}"] if args.checkpoints else []), *args.overrides]),
        "settings": {"generator": recipe.generator.options.model, "retriever": recipe.retriever.options.model,
                     "batch_size": recipe.train.batch_size, "rounds": args.rounds, "warmup": args.warmup,
                     "k_p": recipe.candidates.prior_top_k, "k_q": recipe.candidates.posterior_top_k,
                     "deepspeed": recipe.deepspeed.config, "setting": args.setting,
                     "memory": "peak above the step's start"},
        "estimators": rows,
    }


def _changed(run: Any, options: Options | None) -> dict[str, Any]:
    """The generator options a study changed from the recipe's."""
    if options is None:
        return {}
    recipe = run.generator.options.model_dump(mode="json")
    return {k: v for k, v in options.model_dump(mode="json").items() if recipe.get(k) != v}


def average(steps: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per estimator the mean over the measured steps of its median seconds, tokens and memory; ratios of means."""
    labels = list(steps[0]["estimators"])
    rows = {}
    for label in labels:
        entries = [entry["estimators"][label] for entry in steps]
        row = {k: statistics.mean(e[k] for e in entries) for k in ("median_s", "tokens", "tokens_with_grad",
                                                                    "tokens_per_s", "peak_mib")}
        keys = sorted({k for e in entries for k in e["stats"]})
        row["stats"] = {k: statistics.mean(e["stats"][k] for e in entries if k in e["stats"]) for k in keys}
        rows[label] = {"estimator": entries[0]["estimator"], "options": entries[0]["options"],
                       "generator_options": entries[0]["generator_options"], **row}
    for label, row in rows.items():
        row["vs_rag"] = row["median_s"] / rows[args.baseline]["median_s"] if args.baseline in rows else None
        row["vs_floor"] = row["median_s"] / rows[args.floor]["median_s"] if args.floor in rows else None
    return rows


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
             "| estimator | s/step | × rag | × floor | generator tokens/step (with grad) | tokens/s | peak MiB "
             "| pairs scored |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in report["estimators"].items():
        ratio = [f"{row[k]:.2f}" if row[k] is not None else "n/a" for k in ("vs_rag", "vs_floor")]
        pairs = row["stats"].get("pairs_scored")
        lines.append(f"| {label} | {row['median_s']:.2f} | {ratio[0]} | {ratio[1]} | {row['tokens']:,.0f} "
                     f"({row['tokens_with_grad']:,.0f}) | {row['tokens_per_s']:,.0f} | {row['peak_mib']:.0f} | "
                     f"{'' if pairs is None else f'{pairs:.1f}'} |")
    for label, row in report["estimators"].items():
        if row["estimator"] == "jsa" and row["vs_rag"] is not None and row["vs_floor"] is not None:
            lines.append(f"\n- {label}: {row['vs_rag']:.2f} × rag (goal ≤ 0.5: "
                         f"{'met' if row['vs_rag'] <= 0.5 else 'not met'}), {row['vs_floor']:.2f} × floor (goal ≤ 3: "
                         f"{'met' if row['vs_floor'] <= 3 else 'not met'})")
    return "\n".join(lines)
