"""Assemble a run from a recipe: process group, data, knowledge base, the chosen components, one DeepSpeed engine."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jsarag.components import Component, RunContext, Trainable
from jsarag.data import ExampleSet, default_data_dir, load_examples
from jsarag.engine import build_engine, init_distributed, load_ds_config
from jsarag.errors import RecipeError
from jsarag.kb import load_kb
from jsarag.models import cache_dir
from jsarag.plugins import Plugins
from jsarag.recipe import Recipe

log = logging.getLogger("jsarag.run")
BUILD_ORDER = ("estimator", "index", "retriever", "generator")  # a retriever needs its index; both read the estimator


@dataclass
class Run:
    """Everything one training or evaluation run is made of."""

    recipe: Recipe
    ctx: RunContext
    plugins: Plugins
    components: dict[str, Component]
    observers: list[Component]
    train_set: ExampleSet | None
    eval_sets: dict[str, ExampleSet]
    engine: object = None

    def call(self, hook: str, **kwargs):
        """Call a hook on the run's plugins."""
        return self.plugins.call(hook, **kwargs)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(recipe: Recipe, train: bool = True, kinds: tuple[str, ...] = BUILD_ORDER) -> Run:
    """Build a run of the given component kinds; with ``train`` a DeepSpeed engine wraps every trainable module."""
    # Subnormal floats (below 1.2e-38) make CPU matmuls ~150x slower; rag's backward meets them whenever a passage's
    # posterior weight is ~1e-40, turning a 2 s step into a minute. Flushing them to zero changes only such values.
    torch.set_flush_denormal(True)
    rank, world, device = init_distributed()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    seed_everything(recipe.train.seed)
    data_dir = recipe.data.dir or default_data_dir()
    kb = load_kb(recipe.data.kb_source())
    output_dir = recipe.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    ds_config = load_ds_config(recipe.deepspeed.config, recipe.deepspeed.overrides, recipe.train, output_dir)
    ctx = RunContext(recipe=recipe, kb=kb, output_dir=output_dir, cache_dir=cache_dir(), device=device,
                     rank=rank, world_size=world, ds_config=ds_config)
    plugins = Plugins()
    components = {kind: _build(kind, getattr(recipe, kind), ctx, plugins) for kind in BUILD_ORDER if kind in kinds}
    observers = [_build("observer", name, ctx, plugins) for name in recipe.observers]
    run = Run(recipe, ctx, plugins, components, observers,
              train_set=_examples(data_dir, recipe.data.train_split, kb, recipe) if train else None,
              eval_sets={s: _examples(data_dir, s, kb, recipe) for s in recipe.data.eval_splits})
    run.engine = build_engine(_trainables(components), ds_config, recipe.train) if train else None
    seed_everything(recipe.train.seed * 1000 + rank)  # sampling differs across ranks, repeats across runs
    return run


def _build(kind: str, spec, ctx: RunContext, plugins: Plugins) -> Component:
    name, options = (spec, None) if isinstance(spec, str) else (spec.name, spec.options)
    registered = plugins.component(kind, name)
    component = registered.cls(options if options is not None else registered.cls.Options(), ctx)
    if kind != "observer":
        ctx.components[kind] = component
    plugins.join(component, kind, name)
    return component


def _trainables(components: dict[str, Component]) -> dict[str, Trainable]:
    found: dict[str, Trainable] = {}
    for kind, component in components.items():
        for name, trainable in component.trainable().items():
            if name in found:
                raise RecipeError(f"two components train a module named '{name}' (the second is the {kind})")
            found[name] = trainable
    if not found:
        raise RecipeError("nothing to train: every component has learning rate 0")
    return found


def _examples(data_dir: Path, split: str, kb, recipe: Recipe) -> ExampleSet:
    return load_examples(recipe.data.split_source(split), kb, drop_unanswerable=recipe.data.drop_unanswerable,
                         on_error=recipe.data.on_error)
