"""ZeRO-3's parameter gathers per training step, per estimator, on 2 ranks: what jsa's second pass costs.

    deepspeed --num_gpus 2 benchmarks/zero3_gathers.py --config recipes/dialog_jsa.yaml [--steps 3] [key=value ...]

Each rank runs the same steps (one optimizer step per estimator on a shared batch, learning rate 0, as in
``jsarag bench step-cost``) with DeepSpeed's communication logger on; per estimator it prints the mean all-gather
calls and MiB per step on rank 0 (ZeRO-3 gathers every layer's parameters before each forward and backward that
uses it) and the seconds per step (the slower rank). Estimators: jsa (rescore from the kept states of the frozen
layers), jsa_noreuse (the rescore runs the whole model: a second gather sweep), jsa_single (one gradient pass),
rag. The ds config is the recipe's (``deepspeed.config=zero3.json`` by default here); compare configs by running
again with ``deepspeed.overrides=...``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

STUDIES = [("jsa", "jsa", {}), ("jsa_noreuse", "jsa", {"reuse_frozen_layers": False}),
           ("jsa_single", "jsa", {"grad_pass": "single"}), ("rag", "rag", {})]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("recipes/dialog_jsa.yaml"))
    parser.add_argument("--steps", type=int, default=3, help="measured steps per estimator (after one warm-up)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import deepspeed.comm as dist
    import torch

    from jsarag.loop import LoopState, next_batch
    from jsarag.plugins import Plugins
    from jsarag.recipe import load_recipe
    from jsarag.run import build_run
    from jsarag.tools.bench_step import scoring_options, timed_step
    from jsarag.tools.diagnose import Study, estimator_options

    plugins = Plugins()
    recipe = load_recipe(args.config, ["deepspeed.config=zero3.json", "train.grad_accum=1", *args.overrides], plugins)
    run = build_run(recipe)
    dist.configure(enabled=True, prof_all=True, verbose=False)
    generator_options = type(run.generator.options)
    rows = {}
    for label, name, options in STUDIES:
        scoring = {k: v for k, v in options.items() if k in generator_options.model_fields}
        study = Study(label, name, estimator_options(name, label, {k: v for k, v in options.items()
                                                                   if k not in scoring}, recipe, plugins))
        estimator = run.new_estimator(name, study.options)
        swapped = generator_options.model_validate({**run.generator.options.model_dump(), **scoring})
        state, figures = LoopState(), []
        for step in range(args.steps + 1):
            batch = next_batch(run, state)
            dist.comms_logger.comms_dict = {}
            with scoring_options(run, swapped):
                seconds = timed_step(run, estimator, study, batch)["seconds"]
            gathers = [(size, entry[0]) for op, sizes in dist.comms_logger.comms_dict.items() if "all_gather" in op
                       for size, entry in sizes.items()]
            slowest = torch.tensor([seconds])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if step > 0:
                figures.append((sum(c for _, c in gathers), sum(s * c for s, c in gathers) / 2**20,
                                float(slowest)))
        rows[label] = [statistics.mean(f[i] for f in figures) for i in range(3)]
    if run.ctx.rank == 0:
        print(f"\nZeRO-3 on {run.ctx.world_size} ranks, {recipe.generator.options.model}, "
              f"k_p = {recipe.candidates.prior_top_k}, k_q = {recipe.candidates.posterior_top_k}, "
              f"batch {recipe.train.batch_size} per rank; mean of {args.steps} steps\n")
        print("| estimator | all-gather calls/step | all-gather MiB/step (rank 0) | s/step (slower rank) |")
        print("|---|---|---|---|")
        for label, (calls, mib, seconds) in rows.items():
            print(f"| {label} | {calls:.0f} | {mib:.1f} | {seconds:.2f} |")
    from jsarag.engine import shutdown

    sys.stdout.flush()
    shutdown(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
