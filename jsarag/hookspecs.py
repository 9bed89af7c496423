"""Every hook of jsarag, typed. Plugins implement them with ``@jsarag.hookimpl``.

Two families:
- registration hooks, called once when plugins load: a plugin calls ``register(name, cls)`` for each component
  class it offers; a recipe then picks components by name and only the chosen ones join the run;
- run hooks, implemented by the chosen component instances: the four hook points of a training step
  (``retrieve -> sample -> score -> update``), ``generate`` for evaluation, and the observer hooks.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from jsarag.components import Component
    from jsarag.types import Batch, Candidates, ScoreRequest, Scores, StepResult

hookspec = pluggy.HookspecMarker("jsarag")
hookimpl = pluggy.HookimplMarker("jsarag")

Register = Callable[[str, "type[Component]"], None]
"""``register(name, cls)``: offer a component class under a name recipes can pick."""


# -- registration ---------------------------------------------------------------------------------------------------

@hookspec
def register_retrievers(register: Register) -> None:
    """Register retriever classes (query encoders that propose candidate passages)."""


@hookspec
def register_indexes(register: Register) -> None:
    """Register index classes (nearest-neighbour search over passage embeddings)."""


@hookspec
def register_generators(register: Register) -> None:
    """Register generator classes (models of p(y|x,h))."""


@hookspec
def register_estimators(register: Register) -> None:
    """Register estimator classes (turn generator scores into a training loss)."""


@hookspec
def register_observers(register: Register) -> None:
    """Register observer classes (progress, logs, plots: they watch, never change training)."""


# -- the four hook points of a step ---------------------------------------------------------------------------------

@hookspec
def extra_candidates(batch: Batch) -> list[list[int]]:
    """Return, per example, KB rows the retriever must add to the candidates (a sampler's cached state, say)."""


@hookspec(firstresult=True)
def retrieve(batch: Batch, train: bool) -> Candidates:
    """Return each example's candidate passages with prior (and, in training, posterior) logits."""


@hookspec(firstresult=True)
def sample(batch: Batch, candidates: Candidates) -> ScoreRequest:
    """Choose the (example, candidate) pairs whose answer likelihood the generator must score."""


@hookspec(firstresult=True)
def score(batch: Batch, candidates: Candidates, request: ScoreRequest) -> Scores:
    """Return the generator's token log-likelihoods of each requested pair, batched."""


@hookspec(firstresult=True)
def update(
    batch: Batch,
    candidates: Candidates,
    request: ScoreRequest,
    scores: Scores,
    rescore: Callable[[ScoreRequest], Scores],
) -> StepResult:
    """Form the micro-batch's loss from the scores; call ``rescore`` for a second, gradient-carrying pass."""


# -- evaluation -----------------------------------------------------------------------------------------------------

@hookspec(firstresult=True)
def generate(batch: Batch, candidates: Candidates) -> list[str]:
    """Return one decoded answer per example, given the prior's ranked candidates."""


# -- observers ------------------------------------------------------------------------------------------------------

@hookspec
def on_train_start(config: Any, start_step: int, max_steps: int) -> None:
    """Note the start (or resumption) of training."""


@hookspec
def on_step_end(step: int, loss: float, stats: dict[str, float]) -> None:
    """Note the end of an optimizer step with its mean loss and estimator statistics."""


@hookspec
def on_eval_end(step: int, split: str, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
    """Note the metrics of an evaluation and its first examples (question, answer, prediction, retrieved passages)."""


@hookspec
def on_checkpoint(step: int, path: Path) -> None:
    """Note a complete checkpoint written at ``path``."""


@hookspec
def on_train_end(step: int, metrics: dict[str, Any]) -> None:
    """Note the end of training with the run's metrics (``metrics.json`` content)."""
