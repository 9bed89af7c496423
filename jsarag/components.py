"""What a plugin's component class looks like, and the run context it is built with.

A component is a class with an ``Options`` schema (a pydantic model: the recipe section it accepts, each field
documented) and a constructor ``(options, ctx)``. Its hook methods carry ``@hookimpl`` and are called by the loop
once the instance joins the run. Trainable parts are declared through ``trainable()``; state that must survive a
checkpoint (a sampler's cache, say) through ``state_dict()`` / ``load_state_dict()``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Iterator, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Strict

if TYPE_CHECKING:
    from jsarag.kb import KnowledgeBase
    from jsarag.recipe import Recipe


PathOption = Annotated[Path, Strict(False)]  # a path option: a YAML string becomes a Path (Options are strict)


class Options(BaseModel):
    """Base of every component's option schema: unknown keys are errors, and values are taken strictly as YAML wrote
    them (``"100"`` or ``true`` is not an int, ``2.0`` not an int, ``.inf``/``.nan`` not a float); annotate a path
    option ``PathOption`` so that a string is accepted for it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True, allow_inf_nan=False)


class Trainable(NamedTuple):
    """A module the DeepSpeed engine trains, with its learning rate."""

    module: torch.nn.Module
    lr: float


class Component:
    """Base class of retrievers, indexes, generators, estimators and observers."""

    kind: ClassVar[str] = "component"
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options, ctx: RunContext) -> None:
        self.options = options
        self.ctx = ctx

    def trainable(self) -> dict[str, Trainable]:
        """Return the modules this component trains, by name (unique within the run)."""
        return {}

    def counters(self) -> dict[str, int]:
        """Return counts of inputs this component altered or left out (truncated passages, say), for reports."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Return training state to checkpoint beside the model (tensors and plain Python values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class Truncations:
    """Mixin of components that cut inputs to fit: ``self.truncated[what]`` holds the keys of the distinct items cut
    (KB rows, text hashes), reported by ``counters()`` and kept in the checkpoint, so a resumed run counts the same."""

    truncated: dict[str, set[int]]

    def counters(self) -> dict[str, int]:
        """Return how many distinct items of each kind this rank cut."""
        return {f"{what}_truncated": len(seen) for what, seen in self.truncated.items()}

    def state_dict(self) -> dict[str, Any]:
        """Return the keys of the items cut so far."""
        return {"truncated": {what: sorted(seen) for what, seen in self.truncated.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        for what, seen in state.get("truncated", {}).items():
            self.truncated[what] = set(seen)


@dataclass
class RunContext:
    """What components may know about the run they join."""

    recipe: Recipe
    kb: KnowledgeBase
    output_dir: Path
    cache_dir: Path
    device: torch.device
    rank: int = 0
    world_size: int = 1
    ds_config: dict[str, Any] = field(default_factory=dict)
    components: dict[str, Component] = field(default_factory=dict)  # kind -> instance, filled as they are built

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of the run's DeepSpeed config."""
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @contextlib.contextmanager
    def partitioned_init(self) -> Iterator[None]:
        """Build Hugging Face models inside this block so that ZeRO-3 partitions them as they load."""
        if self.zero_stage < 3:
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        keep_alive = HfDeepSpeedConfig(self.ds_config)  # transformers holds only a weak reference
        try:
            yield
        finally:
            del keep_alive
            unset_hf_deepspeed_config()

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process)."""
        if self.world_size > 1:
            torch.distributed.barrier()
