"""The ``jsarag`` command: plugins, train, eval, index build; and ``recipe_main`` for recipe scripts.

Every command that runs models works as plain ``python``/``jsarag`` (one process) and under the ``deepspeed``
launcher (``deepspeed --num_gpus N $(which jsarag) train ...`` or ``deepspeed recipes/<recipe>.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from jsarag.errors import JsaragError


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``jsarag`` console script."""
    parser = argparse.ArgumentParser(prog="jsarag", description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("plugins", help="list registered components by kind, with their packages")
    for name, help_text in [("train", "train from a recipe"), ("eval", "evaluate a recipe's (trained) models")]:
        sub = commands.add_parser(name, help=help_text)
        _recipe_arguments(sub, required=True)
    index = commands.add_parser("index", help="passage indexes").add_subparsers(dest="action", required=True)
    _recipe_arguments(index.add_parser("build", help="embed the KB and build the recipe's index"), required=True)
    args = parser.parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "plugins": _plugins, "train": _train, "eval": _eval, "index": _index_build,
    }
    _exit(lambda: handlers[args.command](args), distributed=args.command != "plugins")


def recipe_main(default_config: Path, argv: Sequence[str] | None = None) -> None:
    """Run a recipe script: ``--config`` (default: the YAML beside the script) and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=f"train from {default_config.name}")
    _recipe_arguments(parser, required=False, default=default_config)
    _exit(lambda: _train(parser.parse_args(argv)), distributed=True)


def _recipe_arguments(parser: argparse.ArgumentParser, required: bool, default: Path | None = None) -> None:
    parser.add_argument("--config", type=Path, required=required, default=default, help="recipe YAML")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")


def _exit(command: Callable[[], int], distributed: bool) -> None:
    """Run a command; print project errors without a traceback; end cleanly under DeepSpeed."""
    code = 1
    try:
        code = command()
    except JsaragError as exc:
        print(f"jsarag: error: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", []):
            print(f"  {note}", file=sys.stderr)
        code = 2
    finally:
        if distributed and "jsarag.engine" in sys.modules:
            from jsarag.engine import shutdown

            shutdown(code)
    sys.exit(code)


def _plugins(args: argparse.Namespace) -> int:
    from jsarag.plugins import get_plugins

    for kind, registered in get_plugins().registry().items():
        print(f"{kind.replace('index', 'indexe')}s:")
        for name, entry in sorted(registered.items()):
            print(f"  {name:<16} {entry.cls.__module__}.{entry.cls.__name__}  (plugin {entry.plugin}, package {entry.package})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from jsarag.loop import train
    from jsarag.recipe import load_recipe
    from jsarag.report import print_summary
    from jsarag.run import build_run

    run = build_run(load_recipe(args.config, args.overrides))
    metrics = train(run)
    if run.ctx.rank == 0:
        print_summary(metrics, run.recipe.output_dir)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from jsarag.evaluate import evaluate
    from jsarag.loop import load_latest_weights
    from jsarag.recipe import load_recipe
    from jsarag.run import build_run

    run = build_run(load_recipe(args.config, args.overrides))
    step = load_latest_weights(run)
    for split in run.eval_sets:
        metrics = evaluate(run, split)
        if run.ctx.rank == 0:
            print(f"step {step} {split}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def _index_build(args: argparse.Namespace) -> int:
    from jsarag.recipe import load_recipe
    from jsarag.run import build_run

    run = build_run(load_recipe(args.config, args.overrides), train=False, kinds=("estimator", "index", "retriever"))
    index = run.components["index"]
    if run.ctx.rank == 0:
        print(f"index ready in {index.folder} for {len(run.ctx.kb)} passages of {run.ctx.kb.path}")
    return 0
