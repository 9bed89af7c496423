"""Assemble a run from a recipe: process group, data, knowledge base, the chosen components, one DeepSpeed engine;
and the run's hook points, each answered by the one component of the right kind.

    candidates = run.retrieve(batch)                          # the framework, with the prior's and posterior's
                                                              #   encode / search / score
    request    = run.sample(batch, candidates)                # the estimator
    scores     = run.score(batch, candidates, request)        # the generator
    result     = run.update(batch, candidates, request, scores)   # the estimator (may have the generator rescore)

Observers watch each answer (``Observer.on_hook``) and every lifecycle event; ``JSARAG_TRACE_PLUGINS=1`` prints
each call. An exception inside a component is re-raised as a PluginError naming the component and its plugin.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from jsarag import checkpoint
from jsarag.api import (
    Batch,
    Candidates,
    Component,
    Context,
    Estimator,
    Generator,
    Observer,
    Retriever,
    ScoreRequest,
    Scores,
    StepResult,
    Trainable,
)
from jsarag.candidates import candidate_set, clamped_top_k, ranked
from jsarag.data import ExampleSet, load_examples
from jsarag.engine import build_engine, init_distributed, load_ds_config
from jsarag.errors import JsaragError, PluginError, RecipeError
from jsarag.kb import load_kb
from jsarag.models import cache_dir
from jsarag.plugins import Plugins, Registered, trace, tracing
from jsarag.recipe import CandidatesConfig, ComponentSpec, Recipe
from jsarag.safety import check_resume, lock_output_dir, prepare_output_dir

log = logging.getLogger("jsarag.run")
T = TypeVar("T")


@dataclass
class Run:
    """Everything one training or evaluation run is made of, and its hook points."""

    recipe: Recipe
    ctx: Context  # the run's own context (role "run")
    plugins: Plugins
    prior: Retriever
    posterior: Retriever | None  # None when the estimator needs none; the prior itself with `posterior: prior`
    generator: Generator | None  # None in a retrieval-only run (``jsarag index``)
    estimator: Estimator
    observers: list[Observer]
    train_set: ExampleSet | None
    eval_sets: dict[str, ExampleSet]
    candidates_config: CandidatesConfig
    sources: dict[int, Registered]  # id(component) -> the registry entry it was built from
    engine: Any = None
    clamped: dict[str, int] = field(default_factory=dict)  # top-k settings larger than the KB -> the value used
    started: float = field(default_factory=time.monotonic)  # when building the run began (time.monotonic)

    # -- the hook points -------------------------------------------------------------------------------------------

    def retrieve(self, batch: Batch) -> Candidates:
        """Hook point 1: the training candidates, prior ∪ posterior ∪ the estimator's extra rows, with both logits."""
        extra = self.estimator.extra_rows(batch) if self.estimator.adds_rows else []
        posterior = self.posterior if self.estimator.needs_posterior else None
        return self._answer("retrieve", self.prior, batch, lambda: candidate_set(
            batch, self.prior, posterior, self.candidates_config, len(self.ctx.kb), self.ctx.history_turns, extra))

    def sample(self, batch: Batch, candidates: Candidates) -> ScoreRequest:
        """Hook point 2: which (example, passage) pairs the generator scores (the estimator)."""
        return self._answer("sample", self.estimator, batch, lambda: self.estimator.sample(batch, candidates))

    def score(self, batch: Batch, candidates: Candidates, request: ScoreRequest) -> Scores:
        """Hook point 3: log p(y|x,h) of the requested pairs (the generator)."""
        return self._answer("score", self.generator, batch, lambda: self.generator.score(batch, candidates, request))

    def update(self, batch: Batch, candidates: Candidates, request: ScoreRequest, scores: Scores) -> StepResult:
        """Hook point 4: the micro-batch's loss (the estimator); it may have the generator score pairs again."""
        def rescore(again: ScoreRequest) -> Scores:
            return self.score(batch, candidates, again)

        return self._answer("update", self.estimator, batch,
                            lambda: self.estimator.update(batch, candidates, request, scores, rescore))

    def rank(self, batch: Batch, k: int) -> Candidates:
        """The prior's top-k passages of each example, best first (evaluation, ``jsarag index search``)."""
        return self._answer("retrieve", self.prior, batch, lambda: ranked(batch, self.prior, k,
                                                                          self.ctx.history_turns))

    def generate(self, batch: Batch, candidates: Candidates) -> list[str]:
        """One decoded answer per example from the prior's ranked candidates (the generator)."""
        return self._answer("generate", self.generator, batch, lambda: self.generator.generate(batch, candidates))

    def _answer(self, hook: str, component: Component, batch: Batch, call: Callable[[], T]) -> T:
        """Call the component that answers ``hook``; let the observers watch; name the plugin in its errors."""
        if tracing():
            trace(f"{hook} -> {component.ctx.role} {self.registered(component).describe()}")
        try:
            result = call()
        except JsaragError:
            raise
        except Exception as exc:
            raise PluginError(f"{component.ctx.role}, {self.registered(component).describe()}, raised in {hook}: "
                              f"{type(exc).__name__}: {exc}") from exc
        for observer in self.observers:
            observer.on_hook(hook, batch, result)
        return result

    # -- what the loop and the tools need ----------------------------------------------------------------------------

    def components(self) -> dict[str, Component]:
        """The run's components by role (the prior once when it is also the posterior), observers excluded."""
        roles = {"prior": self.prior, "posterior": self.posterior, "generator": self.generator,
                 "estimator": self.estimator}
        return {role: c for role, c in roles.items() if c is not None and (role != "posterior" or c is not self.prior)}

    def registered(self, component: Component) -> Registered:
        """The registry entry a component of this run was built from."""
        return self.sources[id(component)]

    def notify(self, event: str, **kwargs: Any) -> None:
        """Send a lifecycle event (``on_train_start``, ``on_step_end``, ...) to every component, then the observers."""
        for component in [*self.components().values(), *self.observers]:
            if tracing():
                trace(f"{event} -> {component.ctx.role} {self.registered(component).describe()}")
            getattr(component, event)(**kwargs)

    def new_estimator(self, name: str, options: Any) -> Estimator:
        """A new estimator of this run's KB and devices (tools compare several on one run)."""
        registered = self.plugins.component("estimator", name)
        estimator = _build(registered, options, _role(self.ctx, "estimator"))
        self.sources[id(estimator)] = registered
        return estimator

    @contextlib.contextmanager
    def using(self, estimator: Estimator | None = None, candidates: CandidatesConfig | None = None) -> Iterator[None]:
        """Let another estimator and/or candidate setting answer the hook points for the duration of the block (the
        posterior joins the candidates only for an estimator that needs one, as in a run of that estimator)."""
        if estimator is not None and estimator.needs_posterior and self.posterior is None:
            raise RecipeError(f"{self.registered(estimator).describe()} needs a posterior, which this run did not "
                              "build: build the run for an estimator that needs one")
        saved = self.estimator, self.candidates_config
        self.estimator = estimator or self.estimator
        self.candidates_config = candidates or self.candidates_config
        try:
            yield
        finally:
            self.estimator, self.candidates_config = saved


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(recipe: Recipe, train: bool = True, engine: bool | None = None, generator: bool = True,
              plugins: Plugins | None = None, exclusive: bool = False) -> Run:
    """Build a run: with ``train`` the train split is loaded and (unless ``engine`` is False) a DeepSpeed engine wraps
    every trainable module; without ``generator`` only the retrievers are built (retrieval-only commands). With
    ``exclusive`` (``jsarag train``) the run locks output_dir for this process and refuses checkpoints there that
    another recipe wrote, before anything loads (``jsarag.safety``)."""
    # Subnormal floats (below 1.2e-38) make CPU matmuls ~150x slower; rag's backward meets them whenever a passage's
    # posterior weight is ~1e-40, turning a 2 s step into a minute. Flushing them to zero changes only such values.
    torch.set_flush_denormal(True)
    started = time.monotonic()
    plugins = plugins or Plugins()
    with contextlib.redirect_stdout(io.StringIO()) as library_output:  # DeepSpeed prints its op builds
        rank, world, device = init_distributed()
    output_dir = recipe.output_dir
    configure_logging(rank)
    on_rank_zero(lambda: prepare_output_dir(output_dir), world)
    output_dir.mkdir(parents=True, exist_ok=True)  # other hosts' view of it
    configure_logging(rank, output_dir)
    log_library_output(library_output.getvalue())
    resolved = recipe.resolved()
    if not plugins.component("estimator", recipe.estimator.name).cls.needs_posterior:
        resolved["posterior"] = None  # this run builds none
    if exclusive:
        on_rank_zero(lambda: lock_output_dir(output_dir), world)
        on_rank_zero(lambda: _check_resumable(recipe, resolved, world), world)
    seed_everything(recipe.train.seed)
    kb = load_kb(recipe.data.kb_source())
    train_set = _examples(recipe.data.train_split, kb, recipe) if train else None
    eval_sets = {s: _examples(s, kb, recipe) for s in recipe.data.eval_splits}
    ds_config = load_ds_config(recipe.deepspeed.config, recipe.deepspeed.overrides, recipe.train, output_dir)
    ctx = Context(role="run", kb=kb, output_dir=output_dir, cache_dir=cache_dir(), device=device, rank=rank,
                  world_size=world, history_turns=recipe.data.max_history_turns, ds_config=ds_config,
                  recipe=resolved, recipe_source=recipe.source)
    index = plugins.component("index", recipe.index.name)
    ctx.new_index = lambda: _build(index, recipe.index.options, _role(ctx, "index"))
    sources: dict[int, Registered] = {}

    def build(role: str, kind: str, spec: ComponentSpec) -> Any:
        registered = plugins.component(kind, spec.name)
        component = _build(registered, spec.options, _role(ctx, role))
        sources[id(component)] = registered
        return component

    estimator = build("estimator", "estimator", recipe.estimator)
    clamped = _clamped(recipe, len(kb), estimator.needs_posterior, rank)
    prior = build("prior", "retriever", recipe.retriever)
    posterior = None
    if estimator.needs_posterior:
        posterior = prior if recipe.posterior.shares_prior else build("posterior", "retriever", recipe.posterior)
    run = Run(recipe, ctx, plugins, prior, posterior,
              generator=build("generator", "generator", recipe.generator) if generator else None,
              estimator=estimator,
              observers=[build(spec.name, "observer", spec) for spec in recipe.observers],
              train_set=train_set, eval_sets=eval_sets, candidates_config=recipe.candidates, sources=sources,
              clamped=clamped, started=started)
    if train if engine is None else engine:
        run.engine = build_engine(trainables(run), ds_config, recipe.train)
    seed_everything(recipe.train.seed * 1000 + rank)  # sampling differs across ranks, repeats across runs
    return run


def on_rank_zero(check: Callable[[], None], world: int) -> None:
    """Run a check on rank 0 and raise its JsaragError on every rank (a collective with several ranks)."""
    error = None
    if torch.distributed.get_rank() == 0 if world > 1 else True:
        try:
            check()
        except JsaragError as exc:
            error = exc
    if world > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        error.every_rank = world > 1
        raise error


def _check_resumable(recipe: Recipe, resolved: dict[str, Any], world: int) -> None:
    """Refuse checkpoints in output_dir that ``resume: never`` forbids or another recipe wrote (rank 0)."""
    root = recipe.output_dir / "checkpoints"
    tag = checkpoint.latest(root)
    if tag is None:
        return
    if recipe.resume == "never":
        raise RecipeError(f"resume: never, but {root} already holds checkpoints (the latest is {tag}); a new run there "
                          "would mix two runs' checkpoints. Choose another output_dir, delete that folder, or set "
                          "resume: auto to continue the run")
    saved = checkpoint.load_loop_state(root, tag, 0)
    check_resume(saved.get("run"), resolved, world, recipe.resume, str(root / tag))


def _clamped(recipe: Recipe, kb_size: int, needs_posterior: bool, rank: int) -> dict[str, int]:
    """The top-k settings larger than the KB, with the value used; a warning for each (rank 0)."""
    settings = {"eval.top_k": recipe.eval.top_k}
    if recipe.candidates.mode == "topk":
        settings["candidates.prior_top_k"] = recipe.candidates.prior_top_k
        if needs_posterior:
            settings["candidates.posterior_top_k"] = recipe.candidates.posterior_top_k
    clamped = clamped_top_k(settings, kb_size)
    for key, used in clamped.items():
        if rank == 0:
            log.warning("%s: %d is more than the KB's %d passages: using %d", key, settings[key], kb_size, used)
    return clamped


# -- what the terminal shows, what the log file keeps ----------------------------------------------------------------

VERBOSE = "JSARAG_VERBOSE"  # set (to 1) to see every library's log lines and progress bars on the terminal
_installed: list[logging.Handler] = []  # the handlers configure_logging added to the root logger


class TerminalFilter(logging.Filter):
    """What reaches the terminal: rank 0 shows jsarag's own INFO lines, every rank shows warnings; verbose: rank 0
    shows every library's INFO lines too."""

    def __init__(self, rank: int, verbose: bool) -> None:
        super().__init__()
        self.rank, self.verbose = rank, verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return self.rank == 0 and (self.verbose or record.name.startswith("jsarag"))


def configure_logging(rank: int, output_dir: Path | None = None) -> None:
    """Send jsarag's lines and every warning to the terminal and everything, libraries' INFO lines included, to
    <output_dir>/logs/rank<r>.log; quiet the libraries' own handlers and progress bars (unless JSARAG_VERBOSE)."""
    verbose = os.environ.get(VERBOSE, "") not in ("", "0")
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    terminal.addFilter(TerminalFilter(rank, verbose))
    _installed.append(terminal)
    if output_dir is not None:
        (output_dir / "logs").mkdir(exist_ok=True)
        kept = logging.FileHandler(output_dir / "logs" / f"rank{rank}.log", encoding="utf-8", delay=True)
        kept.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _installed.append(kept)
    for handler in _installed:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it found, line by line
    _route_library_loggers(verbose)


def _route_library_loggers(verbose: bool) -> None:
    """Make DeepSpeed's and transformers' loggers write through the root logger (so into the log file), and switch
    their progress bars (weights loading, shards writing) off unless verbose."""
    deepspeed_logger = logging.getLogger("DeepSpeed")
    for handler in list(deepspeed_logger.handlers):  # its own handler prints to stdout
        deepspeed_logger.removeHandler(handler)
    deepspeed_logger.propagate = True
    deepspeed_logger.setLevel(logging.INFO)
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        (transformers_logging.enable_progress_bar if verbose else transformers_logging.disable_progress_bar)()


def log_library_output(text: str) -> None:
    """Keep what a library printed (captured) in the log file."""
    for line in filter(None, (line.rstrip() for line in text.splitlines())):
        logging.getLogger("library").info("%s", line)


def _role(ctx: Context, role: str) -> Context:
    """The context a component of ``role`` is built with (the run's, with its role named)."""
    return dataclasses.replace(ctx, role=role)


def _build(registered: Registered, options: Any, ctx: Context) -> Any:
    started = time.perf_counter()
    try:
        component = registered.cls(options, ctx)
    except JsaragError:
        raise
    except Exception as exc:
        raise PluginError(f"{ctx.role}, {registered.describe()}, failed to build: {type(exc).__name__}: {exc}") from exc
    if tracing():
        trace(f"built {ctx.role} {registered.describe()} in {time.perf_counter() - started:.1f} s")
    return component


def trainables(run: Run) -> dict[str, dict[str, Trainable]]:
    """Every trainable module by role and name, checked: a module trained twice, a 0-dimensional parameter, a module
    with nothing to train, or one off the run's device is a RecipeError naming the component and the parameter."""
    found: dict[str, dict[str, Trainable]] = {}
    owner: dict[int, str] = {}
    for role, component in run.components().items():
        who = f"{role}, {run.registered(component).describe()}"
        for name, trainable in component.trainable().items():
            if not name.isidentifier():
                raise RecipeError(f"{who}: trainable module name {name!r} must be a plain name (letters, digits, _)")
            if id(trainable.module) in owner:
                raise RecipeError(f"{who}: module '{name}' is also trained as {owner[id(trainable.module)]}")
            owner[id(trainable.module)] = f"{role}.{name}"
            _check_parameters(who, name, trainable, run.ctx.device)
            found.setdefault(role, {})[name] = trainable
    if not any(t.lr > 0 for modules in found.values() for t in modules.values()):
        raise RecipeError("nothing to train: every component has learning rate 0")
    return found


def _check_parameters(who: str, name: str, trainable: Trainable, device: torch.device) -> None:
    """Refuse what DeepSpeed would fail on later, with a raw traceback."""
    if not isinstance(trainable.module, torch.nn.Module):
        raise RecipeError(f"{who}: trainable '{name}' is a {type(trainable.module).__name__}, not a torch.nn.Module")
    params = list(trainable.module.named_parameters())
    if trainable.lr > 0 and not any(p.requires_grad for _, p in params):
        raise RecipeError(f"{who}: module '{name}' is listed as trainable (lr {trainable.lr}) but none of its "
                          "parameters requires grad; leave it out of trainable() or unfreeze it")
    for param_name, param in params:
        if param.requires_grad and param.dim() == 0:
            raise RecipeError(f"{who}: parameter '{name}.{param_name}' is 0-dimensional, which DeepSpeed cannot "
                              "broadcast or partition; give it shape (1,)")
        partitioned = hasattr(param, "ds_id")  # ZeRO-3 placed it (DeepSpeed's own attribute)
        if param.device.type != device.type and not partitioned:
            raise RecipeError(f"{who}: parameter '{name}.{param_name}' is on {param.device}, the run on {device}; "
                              f"move the module to ctx.device")


def _examples(split: str, kb, recipe: Recipe) -> ExampleSet:
    return load_examples(recipe.data.split_source(split), kb, drop_unanswerable=recipe.data.drop_unanswerable,
                         on_error=recipe.data.on_error)


__all__ = ["Run", "build_run", "seed_everything", "trainables"]
