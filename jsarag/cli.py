"""The ``jsarag`` command: plugins, train, eval, index, bench, compare, diagnose; ``recipe_main`` for recipe scripts;
``run`` for Python callers (a command in the calling process, its exit code returned).

Every command that runs models works as plain ``python``/``jsarag`` (one process) and under the ``deepspeed``
launcher (``deepspeed --num_gpus N $(which jsarag) train ...`` or ``deepspeed recipes/<recipe>.py``). Commands import
what they need when they run, so that ``jsarag --help`` and ``jsarag plugins`` stay quick.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from jsarag.errors import Interrupted, JsaragError, PluginError


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``jsarag`` console script: run one command, then end the process (its process group too)."""
    args = _parser().parse_args(argv)
    code = _run(args)
    _end(code, distributed=_distributed(args))


def run(argv: Sequence[str]) -> int:
    """Run one ``jsarag`` command in this process and return its exit code, as the console script would exit.

    For notebooks and tests: errors print as the command prints them, and the process stays alive (a process group a
    training command created stays for the next one; a group of one, or this process's rank of a launched job).
    Commands meant for the ``deepspeed`` launcher's ranks still need the launcher for more than one rank.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or arguments argparse refused (it printed why)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _run(args)
    finally:
        _release_locks()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jsarag", description="Train retrieval-augmented generation with the passage as a latent variable "
        "(JSA-RAG, RAG, VRAG) on DeepSpeed; components are pluggy plugins picked by a YAML recipe.",
        epilog="A recipe is a YAML file or the name of a packaged one (tiny_rag, dialog_jsa, ...). "
        "Example: jsarag train --config tiny_rag train.max_steps=10")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    commands = parser.add_subparsers(dest="command", required=True)
    plugins = commands.add_parser("plugins", help="list registered components by kind, with their packages")
    plugins.add_argument("--options", metavar="NAME", help="list the options of the component NAME instead: type, "
                         "default, constraints and what each does")
    config = commands.add_parser("config", help="recipes").add_subparsers(dest="action", required=True)
    shown = config.add_parser("show", help="print the resolved recipe: every key with its default and its comment")
    shown.add_argument("recipe", metavar="RECIPE", help="a recipe file or the name of a packaged one")
    shown.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
    _recipe_arguments(commands.add_parser("train", help="train from a recipe"), required=True)
    evaluation = commands.add_parser("eval", help="evaluate a checkpoint's models (no optimizer is built)")
    evaluation.add_argument("--checkpoint", metavar="step-N", help="the checkpoint (default: the latest complete one)")
    evaluation.add_argument("--out", type=Path, metavar="FILE.json",
                            help="where the metrics go (default: <output_dir>/eval/<checkpoint>.json)")
    _recipe_arguments(evaluation, required=True)
    index = commands.add_parser("index", help="passage indexes").add_subparsers(dest="action", required=True)
    _recipe_arguments(index.add_parser("build", help="embed the KB and build the recipe's index"), required=True)
    _recipe_arguments(index.add_parser("info", help="print the index's fingerprint and sizes (built if needed)"),
                      required=True)
    search = index.add_parser("search", help="retrieve passages for a query with the recipe's retriever and index")
    search.add_argument("-q", "--query", required=True, help="the query text")
    search.add_argument("-k", type=int, default=5, help="passages to print")
    _recipe_arguments(search, required=True)
    exporting = commands.add_parser("export", help="a run's models as Hugging Face / sentence-transformers folders, "
                                    "with the index, the KB, a model card and a recipe that loads them")
    exporting.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run's output_dir")
    exporting.add_argument("out", type=Path, metavar="OUT", help="the folder to write (must not exist)")
    exporting.add_argument("--checkpoint", metavar="step-N", help="the checkpoint (default: the latest complete one)")
    exporting.add_argument("--adapter", action="store_true", help="write the generator's PEFT adapter alone instead "
                           "of merging it into the base model")
    exporting.add_argument("--config", type=Path, help="the recipe it was trained with (default: the one it recorded)")
    exporting.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of that recipe")
    asking = commands.add_parser("ask", help="ranked passages and an answer from a run's (or an export's) models")
    asking.add_argument("folder", type=Path, metavar="RUN_DIR_OR_EXPORT", help="a run's output_dir or an export")
    question = asking.add_mutually_exclusive_group(required=True)
    question.add_argument("-q", "--question", help="one question (printed answer)")
    question.add_argument("--questions", type=Path, metavar="FILE.jsonl",
                          help='questions, one JSON object a line: {"question": ..., "id": ..., "context": [...]}')
    asking.add_argument("-k", type=int, default=5, help="passages shown per question (default 5)")
    asking.add_argument("--checkpoint", metavar="step-N", help="a run folder's checkpoint (default: the latest)")
    asking.add_argument("--out", type=Path, metavar="FILE.jsonl", help="write the JSON lines here (default: stdout)")
    asking.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides, e.g. generator.decode=joint")
    from jsarag.tools.bench_retrieval import add_arguments as bench_arguments

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    bench_arguments(bench.add_parser("retrieval", help="index build/search throughput and recall@k vs raw FAISS"))
    from jsarag.tools.bench_quality import add_arguments as bench_quality_arguments

    bench_quality_arguments(bench.add_parser("quality", help="train estimators alike per dataset and seed; score them"))
    from jsarag.tools.bench_estimators import add_arguments as bench_estimators_arguments

    bench_estimators_arguments(bench.add_parser("estimators", help="planted-retrieval benchmark: curves per "
                                                "estimator over seeds"))
    from jsarag.tools.bench_step import add_arguments as step_cost_arguments

    step_cost_arguments(bench.add_parser("step-cost", help="seconds, generator tokens and memory of a step per estimator"))
    from jsarag.tools.bench_kb import add_arguments as bench_kb_arguments

    bench_kb_arguments(bench.add_parser("kb", help="a synthetic KB of 100k-2M+ passages on 1-2 ranks: RSS, load, "
                                        "search, resume"))
    from jsarag.tools.subset import add_arguments as subset_arguments

    data = commands.add_parser("data", help="data folders").add_subparsers(dest="action", required=True)
    subset_arguments(data.add_parser("subset", help="cut a small, self-consistent data folder from a large one"))
    from jsarag.tools.convert import add_arguments as convert_arguments

    convert_arguments(data.add_parser("convert", help="turn FlashRAG, DPR/Atlas or KILT files into a data folder"))
    diagnose = commands.add_parser("diagnose", help="diagnostics").add_subparsers(dest="action", required=True)
    grad = diagnose.add_parser("grad-variance", help="each estimator's gradient bias, variance and cost vs exact")
    grad.add_argument("--estimators", default="rag,vrag,jsa,exact",
                      help="comma-separated; LABEL:NAME measures one twice, LABEL.key=value sets its options")
    grad.add_argument("--draws", type=int, default=20, help="independent draws per estimator")
    grad.add_argument("--warmup", type=int, default=10,
                      help="micro-steps that fill an estimator's state (jsa's cache) before its cached-regime draws "
                           "(0: fresh chains only)")
    grad.add_argument("--out", type=Path, help="JSON report (default: <output_dir>/grad_variance.json)")
    grad.add_argument("--checkpoints", type=Path, metavar="RUN_DIR",
                      help="measure at the models as built and at every checkpoint of this run (plots per step)")
    _recipe_arguments(grad, required=True)
    compare = commands.add_parser("compare", help="several runs' final metrics side by side (Markdown table)")
    compare.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="output_dir of a run")
    compare.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw a bar chart of the metrics")
    return parser


def _run(args: argparse.Namespace) -> int:
    _set_verbose(args)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "plugins": _plugins, "train": _train, "eval": _eval, "index": _index, "bench": _bench, "compare": _compare,
        "diagnose": _diagnose, "data": _data, "config": _config, "export": _export, "ask": _ask,
    }
    return _guarded(lambda: handlers[args.command](args))


def _distributed(args: argparse.Namespace) -> bool:
    """Whether the command may have joined a process group (the others never import DeepSpeed's engine)."""
    return not (args.command in ("plugins", "compare", "data", "config") or
                args.command == "bench" and args.what != "step-cost")


def recipe_main(default_config: Path, argv: Sequence[str] | None = None) -> None:
    """Run a recipe script: ``--config`` (default: the YAML beside the script) and ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=f"train from {default_config.name}")
    _recipe_arguments(parser, required=False, default=default_config)
    args = parser.parse_args(argv)
    _set_verbose(args)
    _end(_guarded(lambda: _train(args)), distributed=True)


def _set_verbose(args: argparse.Namespace) -> None:
    if getattr(args, "verbose", False):  # only the commands that take a recipe have the flag
        os.environ["JSARAG_VERBOSE"] = "1"  # read where the run's logging is set up (jsarag.run.configure_logging)


def _recipe_arguments(parser: argparse.ArgumentParser, required: bool, default: Path | None = None) -> None:
    parser.add_argument("--config", type=Path, required=required, default=default, help="recipe YAML")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every library's log lines and progress bars on the terminal (also: "
                        "JSARAG_VERBOSE=1); <output_dir>/logs/ keeps them either way")


def _guarded(command: Callable[[], int]) -> int:
    """Run a command and return its exit code; print project errors without a traceback, bugs with one."""
    try:
        return command()
    except Interrupted as exc:  # SIGINT / SIGTERM during training: checkpointed
        _print_once(exc, f"jsarag: {exc}")
        return exc.code
    except JsaragError as exc:
        if isinstance(exc, PluginError) and exc.__cause__ is not None and not isinstance(exc.__cause__, JsaragError):
            traceback.print_exception(exc.__cause__)  # a bug inside a plugin: show where
        notes = "".join(f"\n  {note}" for note in getattr(exc, "__notes__", []))
        _print_once(exc, f"jsarag: error: {exc}{notes}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training began (during it, jsarag.safety.GracefulStop handles it)
        print("jsarag: interrupted (SIGINT) before training began: nothing to save", file=sys.stderr)
        return 130
    except SystemExit as exc:  # a library that exits: its code
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a bug: show where
        traceback.print_exc()
        return 1


def _release_locks() -> None:
    if "jsarag.safety" in sys.modules:
        from jsarag.safety import release_locks

        release_locks()  # emptied: the next run sees no stale lock


def _end(code: int, distributed: bool) -> None:
    """End the process with ``code``: locks released; under DeepSpeed, the group shut down cleanly."""
    _release_locks()
    if distributed and "jsarag.engine" in sys.modules:
        from jsarag.engine import shutdown

        shutdown(code)
    sys.exit(code)


def _print_once(exc: JsaragError, text: str) -> None:
    """Print an error's text; one that every rank raised alike is printed by rank 0 alone, before the other ranks
    exit (the launcher kills the rest of a job once one rank has exited)."""
    if not exc.every_rank:
        print(text, file=sys.stderr)
        return
    from jsarag.engine import barrier_quietly

    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr, flush=True)
    barrier_quietly()


def _plugins(args: argparse.Namespace) -> int:
    from jsarag.plugins import check_class, get_plugins

    if args.options:
        from jsarag.tools.config import describe_component

        print(describe_component(get_plugins(), args.options))
        return 0
    for kind, registered in get_plugins().registry().items():
        print(f"{kind.replace('index', 'indexe')}s:")
        for name, entry in sorted(registered.items()):
            try:
                check_class(entry)
                broken = ""
            except PluginError as exc:
                broken = f"\n      BROKEN: {str(exc).split(': ', 1)[1]}"
            print(f"  {name:<16} {entry.cls.__module__}.{entry.cls.__name__}  (plugin {entry.plugin}, package "
                  f"{entry.package}){broken}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from jsarag.recipe import load_recipe
    from jsarag.tools.config import show

    print(show(load_recipe(args.recipe, args.overrides)), end="")
    return 0


def _export(args: argparse.Namespace) -> int:
    from jsarag.tools.export import export

    export(args.run_dir, args.out, args.checkpoint, args.adapter, args.config, args.overrides)
    return 0


def _ask(args: argparse.Namespace) -> int:
    from jsarag.tools.ask import ask

    ask(args.folder, args.question, args.questions, args.k, args.checkpoint, args.out, args.overrides)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from jsarag.tools.compare import compare

    print(compare(args.runs, args.plot))
    return 0


def _train(args: argparse.Namespace) -> int:
    from jsarag.loop import train
    from jsarag.recipe import load_recipe
    from jsarag.run import build_run
    from jsarag.summary import print_summary

    run = build_run(load_recipe(args.config, args.overrides), exclusive=True)
    metrics = train(run)
    if run.ctx.rank == 0:
        print_summary(metrics, run.recipe.output_dir)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from jsarag.checkpoint import find
    from jsarag.loop import evaluate_checkpoint
    from jsarag.recipe import load_recipe
    from jsarag.run import build_run

    recipe = load_recipe(args.config, args.overrides)
    find(recipe.output_dir / "checkpoints", args.checkpoint)  # a wrong --checkpoint fails before any model loads
    evaluate_checkpoint(build_run(recipe, train=False, engine=False), args.checkpoint, args.out)
    return 0


def _index(args: argparse.Namespace) -> int:
    from jsarag.tools.index import index_command

    return index_command(args.action, args.config, args.overrides, getattr(args, "query", None), getattr(args, "k", 5))


def _diagnose(args: argparse.Namespace) -> int:
    from jsarag.tools.diagnose import grad_variance

    grad_variance(args.config, args.overrides, args.estimators, args.draws, args.out, args.checkpoints, args.warmup)
    return 0


def _data(args: argparse.Namespace) -> int:
    from jsarag.tools.convert import main as convert
    from jsarag.tools.subset import main as subset

    return convert(args) if args.action == "convert" else subset(args)


def _bench(args: argparse.Namespace) -> int:
    if args.what == "quality":
        from jsarag.tools.bench_quality import main as bench_quality

        return bench_quality(args)
    if args.what == "estimators":
        from jsarag.tools.bench_estimators import main as bench_estimators

        return bench_estimators(args)
    if args.what == "step-cost":
        from jsarag.tools.bench_step import main as step_cost

        return step_cost(args)
    if args.what == "kb":
        from jsarag.tools.bench_kb import main as bench_kb

        return bench_kb(args)
    from jsarag.tools.bench_retrieval import main as bench_retrieval

    return bench_retrieval(args)
