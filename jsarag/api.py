"""The public plugin API of jsarag: everything a plugin author needs, in one module.

A plugin is a Python module, found through the entry-point group ``jsarag``, that implements registration hooks::

    from jsarag.api import Retriever, hookimpl

    class MyRetriever(Retriever):
        ...

    @hookimpl
    def register_retrievers(register):
        register("mine", MyRetriever)

A recipe then picks components by name (``retriever: {name: mine, ...}``). Only the chosen components join a run,
and after that the training loop calls their methods directly (simonw/llm's registration, then plain calls).

Five kinds of component, each a base class below: ``Retriever`` (the prior p(h|x), and as a second instance the
posterior q(h|x,y)), ``Index`` (nearest-neighbour search over passage vectors), ``Generator`` (p(y|x,h)),
``Estimator`` (turns generator scores into a loss), ``Observer`` (watches the run, never answers a hook point).
A base class says what its kind must implement (abstract methods) and what it may declare (``ClassVar``
capabilities with defaults); both are checked when a run is built, before any model loads. One training step::

    candidates = retrieve(batch)          # the framework: prior top-k ∪ posterior top-k ∪ estimator.extra_rows,
                                          #   with Retriever.encode / search / score for both logits
    request    = estimator.sample(batch, candidates)                  # which (example, passage) pairs to score
    scores     = generator.score(batch, candidates, request)          # log p(y|x,h), batched
    result     = estimator.update(batch, candidates, request, scores, rescore)   # the loss

Shapes in comments: B examples in a micro-batch, C candidate slots per example, N scored pairs, T answer tokens,
P passages in the knowledge base, d the vector size.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Iterator, Literal, NamedTuple, Protocol

import pluggy
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Strict, field_validator

from jsarag.data import Example, Passage, render_history, text_key
from jsarag.errors import (
    DataError,
    IndexMismatchError,
    JsaragError,
    ModelError,
    PluginError,
    RecipeError,
    TrainingError,
)
from jsarag.files import atomic_write
from jsarag.models import loading, model_fingerprint, resolve_model
from jsarag.paths import stays_inside
from jsarag.summary import metrics_table, shorten

if TYPE_CHECKING:
    import numpy as np

    from jsarag.passages import PassageIndex

__all__ = [
    # registration
    "hookimpl", "Register", "register_retrievers", "register_indexes", "register_generators", "register_estimators",
    "register_observers",
    # options
    "Options", "IndexOptions", "EstimatorOptions", "PathOption", "OutputPath", "Trainable", "Likelihood",
    # the values that travel
    "Example", "Passage", "KnowledgeBase", "Batch", "Candidates", "ScoreRequest", "Scores", "StepResult", "Rescore",
    "PassageIndex",
    # components
    "Context", "Component", "Retriever", "Index", "Generator", "Estimator", "Observer", "Truncations",
    # services
    "atomic_write", "render_history", "text_key", "resolve_model", "model_fingerprint", "loading", "metrics_table",
    "shorten",
    # errors
    "JsaragError", "RecipeError", "PluginError", "DataError", "ModelError", "IndexMismatchError", "TrainingError",
]


def __getattr__(name: str) -> Any:
    """``PassageIndex`` lives with the embedding machinery; it is imported on first use."""
    if name == "PassageIndex":
        from jsarag.passages import PassageIndex

        return PassageIndex
    raise AttributeError(f"module 'jsarag.api' has no attribute {name!r}")


hookspec = pluggy.HookspecMarker("jsarag")
hookimpl = pluggy.HookimplMarker("jsarag")
"""Mark a plugin module's registration hook, e.g. ``@hookimpl def register_retrievers(register): ...``."""

Register = Callable[[str, type], None]
"""``register(name, cls)``: offer a component class under a name recipes can pick."""

Likelihood = Literal["sum", "mean"]
"""How log p(y|x,h) is formed from token log-probabilities: summed, or averaged per answer token."""

PathOption = Annotated[Path, Strict(False)]
"""Annotate a path option with this so that a YAML string is accepted for it (options are strict otherwise)."""

OutputPath = Annotated[Path, Strict(False), AfterValidator(stays_inside)]
"""A path option a component writes to: a relative one (resolved with ``Context.path``) may not climb out of
output_dir with '..'."""


# -- registration hooks (the only pluggy hooks) ---------------------------------------------------------------------

@hookspec
def register_retrievers(register: Register) -> None:
    """Register retriever classes (subclasses of Retriever)."""


@hookspec
def register_indexes(register: Register) -> None:
    """Register index classes (subclasses of Index)."""


@hookspec
def register_generators(register: Register) -> None:
    """Register generator classes (subclasses of Generator)."""


@hookspec
def register_estimators(register: Register) -> None:
    """Register estimator classes (subclasses of Estimator)."""


@hookspec
def register_observers(register: Register) -> None:
    """Register observer classes (subclasses of Observer)."""


# -- options --------------------------------------------------------------------------------------------------------

class Options(BaseModel):
    """Base of every component's option schema: the recipe section it accepts, one documented field per option.

    Unknown keys are errors, and values are taken strictly as YAML wrote them (``"100"`` or ``true`` is not an int,
    ``2.0`` not an int, ``.inf``/``.nan`` not a float); annotate a path option ``PathOption``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)


class IndexOptions(Options):
    """Options every index accepts (an index plugin's Options must extend this class)."""

    dir: Literal["kb"] | PathOption | None = None
    """Where builds are cached: null = <cache>/indexes; ``kb`` = a .jsarag-indexes folder beside the passages file
    (falls back to the cache when that folder is not writable); an absolute path; or a relative path, taken under
    output_dir (it may not climb out with '..')."""

    @field_validator("dir")
    @classmethod
    def _dir_stays_inside(cls, value: str | Path | None) -> str | Path | None:
        return stays_inside(value) if isinstance(value, Path) else value


class EstimatorOptions(Options):
    """Options of an estimator that scores answers with a sum or mean likelihood (most do)."""

    likelihood: Likelihood = "sum"
    """log p(y|x,h) summed over answer tokens, or length-normalised (mean)."""


class Trainable(NamedTuple):
    """A module the DeepSpeed engine trains, with its learning rate. With ``lr`` 0 the engine holds the module
    without training it (none of its parameters need require grad): how a frozen model built under
    ``Context.partitioned_init`` stays partitioned under ZeRO-3 (a partitioned model outside every engine cannot
    run its forward)."""

    module: torch.nn.Module
    lr: float


# -- the values that travel through a step --------------------------------------------------------------------------

class KnowledgeBase(Protocol):
    """The passages a retriever ranks and a generator reads; row i is the source's i-th passage (from 0)."""

    path: Path  # the source the passages came from

    def __len__(self) -> int: ...
    def row(self, passage_id: str) -> int: ...
    def has(self, passage_id: str) -> bool: ...
    def id(self, row: int) -> str: ...
    def passage(self, row: int) -> Passage: ...
    def render(self, row: int) -> str: ...
    def render_many(self, rows: list[int]) -> list[str]: ...

    @property
    def fingerprint(self) -> str: ...


@dataclass
class Batch:
    """A micro-batch of examples and their stable positions in the split (keys for per-example state)."""

    examples: list[Example]
    positions: list[int]

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class Candidates:
    """Each example's candidate passages with the retrievers' logits over them (built by the framework)."""

    rows: torch.Tensor  # (B, C) long: KB rows, -1 marks an empty slot
    prior_logits: torch.Tensor  # (B, C) the prior's logits, with gradient into the prior; -inf on empty slots
    posterior_logits: torch.Tensor | None = None  # (B, C) the posterior's logits over the same rows, or None

    @property
    def mask(self) -> torch.Tensor:
        """(B, C) bool: which slots hold a passage."""
        return self.rows >= 0

    def prior_log_probs(self) -> torch.Tensor:
        """(B, C) log p̃(h|x): the prior renormalised over the candidate set."""
        return torch.log_softmax(self.prior_logits.float(), dim=-1)  # float32: bf16 logits of ~1/τ lose ~0.06 nats

    def posterior_log_probs(self) -> torch.Tensor:
        """(B, C) log q̃(h|x,y): the posterior renormalised over the candidate set."""
        if self.posterior_logits is None:
            raise ValueError("these candidates carry no posterior logits (the estimator declared needs_posterior "
                             "= False, so the run built no posterior)")
        return torch.log_softmax(self.posterior_logits.float(), dim=-1)


@dataclass
class ScoreRequest:
    """Which (example, candidate slot) pairs the generator must score, whether with gradient, and whether some of
    them will be scored again.

    ``keep`` declares, on a request without gradient, that ``rescore`` will score some of these pairs again with
    gradient in the same micro-step (jsa's second pass, exact's chunks). The generator may then keep what it computed
    for them that the gradient pass can start from (``causal_lm``: the hidden states entering its first trained
    layer) and use it for later requests on the same ``Candidates`` object, whose lifetime bounds the kept memory;
    requests on other candidates never see it, and the values scored are the same either way."""

    example: torch.Tensor  # (N,) long: batch row of each pair
    slot: torch.Tensor  # (N,) long: candidate column of each pair
    grad: bool = True
    keep: bool = False  # a gradient-carrying rescore of some of these pairs follows in this micro-step

    def __len__(self) -> int:
        return int(self.example.numel())

    @classmethod
    def all_slots(cls, candidates: Candidates, grad: bool = True, keep: bool = False) -> ScoreRequest:
        """Request every filled slot of every example."""
        example, slot = candidates.mask.nonzero(as_tuple=True)
        return cls(example=example, slot=slot, grad=grad, keep=keep)

    @classmethod
    def where(cls, mask: torch.Tensor, grad: bool = True, keep: bool = False) -> ScoreRequest:
        """Request every (example, slot) where the (B, C) ``mask`` is true."""
        example, slot = mask.nonzero(as_tuple=True)
        return cls(example=example.cpu(), slot=slot.cpu(), grad=grad, keep=keep)


@dataclass
class Scores:
    """The generator's log-likelihood of each requested answer."""

    token_logprobs: torch.Tensor  # (N, T) log p(y_t | x, h, y_<t), 0 on padding; answers are right-aligned
    token_mask: torch.Tensor  # (N, T) bool: which positions are answer tokens

    @property
    def n_tokens(self) -> torch.Tensor:
        """(N,) answer length in tokens."""
        return self.token_mask.sum(-1)

    def loglik(self, likelihood: Likelihood = "sum") -> torch.Tensor:
        """(N,) log p(y|x,h), summed over tokens or length-normalised ('mean')."""
        total = self.token_logprobs.sum(-1)
        return total if likelihood == "sum" else total / self.n_tokens.clamp(min=1)

    def matrix(self, request: ScoreRequest, candidates: Candidates, likelihood: Likelihood = "sum") -> torch.Tensor:
        """(B, C) log p(y|x,h) of the requested pairs, -inf where a slot was not scored."""
        values = self.loglik(likelihood)
        out = torch.full(candidates.rows.shape, float("-inf"), device=values.device, dtype=values.dtype)
        return out.index_put((request.example.to(values.device), request.slot.to(values.device)), values)


@dataclass
class StepResult:
    """An estimator's answer for one micro-batch: the loss to minimise and what to log."""

    loss: torch.Tensor  # () scalar
    stats: dict[str, float] = field(default_factory=dict)


Rescore = Callable[[ScoreRequest], Scores]
"""``rescore(request)``: have the generator score pairs again (a second, gradient-carrying pass); a first request
with ``keep`` lets the generator reuse its work for them."""


# -- what a component knows about its run ---------------------------------------------------------------------------

@dataclass
class Context:
    """What a component may know about the run it joins, and the services the framework offers it."""

    role: str  # the component's role: prior, posterior, index, generator, estimator, or the observer's name
    kb: KnowledgeBase
    output_dir: Path  # the run's folder: a component writes only inside it (or an absolute path the user gave)
    cache_dir: Path  # the shared cache of models and indexes
    device: torch.device
    rank: int = 0
    world_size: int = 1
    history_turns: int = 2  # earlier dialog turns the generator's prompt and the retrievers' queries keep
    ds_config: dict[str, Any] = field(default_factory=dict)  # the run's DeepSpeed config, "auto" values filled
    recipe: dict[str, Any] = field(default_factory=dict)  # the resolved recipe as plain data, every default filled
    # (its "posterior" is None when the run builds none)
    recipe_source: dict[str, Any] = field(default_factory=dict)  # the recipe as written (merged, with overrides)
    sessions: list[dict[str, Any]] = field(default_factory=list)  # each invocation of a training run, oldest first
    # (the first start, then every resume): started, start_step, end_step, seconds, ended, version, commit, host,
    # ranks, command, changes (recipe keys changed at that resume: [old, new]); one list shared by every component
    new_index: Callable[[], Index] | None = None  # builds a fresh instance of the recipe's index component
    loaded: dict[Any, Any] = field(default_factory=dict, repr=False)  # the run's loaded passage indexes (shared)

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage of the run's DeepSpeed config."""
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0 (the one that writes the run's shared files)."""
        return self.rank == 0

    def passage_index(self, encoder: str, encode: Callable[[list[str]], np.ndarray], batch_size: int,
                      live_step: int | None = None, dtype: Literal["float16", "float32"] = "float16",
                      shard_rows: int = 65_536) -> PassageIndex:
        """Return the KB's passage vectors and the recipe's index over them, embedding and building them if needed.

        ``encoder`` names the passage encoder (part of the cache key, with the KB, ``dtype`` and the index options);
        ``encode`` turns ``batch_size`` texts at a time into (n, d) unit vectors, stored as ``dtype``. Every rank
        must call this (each embeds a share of the KB's shards of ``shard_rows`` passages; a killed job resumes
        from its finished shards). With ``live_step`` the KB is re-embedded now (a trained passage encoder) into
        the run's own folder."""
        from jsarag.passages import passage_index

        return passage_index(self, encoder, encode, batch_size, live_step, dtype, shard_rows)

    def live_passage_index(self, encoder: str, dtype: Literal["float16", "float32"] = "float16") -> PassageIndex | None:
        """Return the index this role's trained passage encoder last re-embedded into the run's folder, if any."""
        from jsarag.passages import live_passage_index

        return live_passage_index(self, encoder, dtype)

    def path(self, value: str | Path, key: str) -> Path:
        """Resolve a path option the recipe key ``key`` gave: absolute as written, relative under output_dir."""
        from jsarag.paths import confined

        return confined(value, self.output_dir, key)

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process)."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Return rank 0's picklable ``value`` on every rank (a collective)."""
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Return every rank's picklable ``value``, in rank order (a collective)."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

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


# -- the base classes -----------------------------------------------------------------------------------------------

class Component(abc.ABC):
    """What every component has: options, a context, trainable modules, counters, checkpointed state, and the run's
    lifecycle events (no-ops unless overridden: any component may watch the run, only the chosen one answers its
    hook point)."""

    kind: ClassVar[str] = "component"
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options, ctx: Context) -> None:
        self.options = options
        self.ctx = ctx

    def trainable(self) -> dict[str, Trainable]:
        """Return the modules this component trains, by name (plain names: no dots)."""
        return {}

    def counters(self) -> dict[str, int]:
        """Return counts of inputs this component altered or left out (truncated passages, say), for reports."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Return training state to checkpoint beside the model (tensors and plain Python values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def on_train_start(self, start_step: int, max_steps: int) -> None:
        """Note the start (or resumption, ``start_step`` > 0) of training."""

    def on_step_end(self, step: int, loss: float, stats: dict[str, float]) -> None:
        """Note the end of an optimizer step with its mean loss, the estimator's statistics (averaged over ranks)
        and each trained module's learning rate (``lr/<role>.<name>``)."""

    def on_eval_end(self, step: int, split: str, metrics: dict[str, float], samples: list[dict[str, Any]]) -> None:
        """Note an evaluation's metrics and its first examples (question, answer, prediction, retrieved passages)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Note a complete checkpoint written at ``path``."""

    def on_train_end(self, step: int, metrics: dict[str, Any]) -> None:
        """Note the end of training with the run's metrics (the content of metrics.json)."""

    def on_train_failed(self, step: int, error: BaseException) -> None:
        """Note that training stopped on ``error`` after ``step`` and the process is about to exit: close what you
        hold (a tracker's run, a file). Make no collective call: other ranks may be gone."""

    def export(self, folder: Path, adapter: bool = False) -> dict[str, Any] | None:
        """Write this component's models, with the weights they hold now, into ``folder`` in their library's own
        format, loadable without jsarag (a Hugging Face or sentence-transformers folder); return the options of a
        recipe section that loads them back (paths inside ``folder`` as absolute paths), or None (the default)
        when the component has nothing to export. ``adapter``: write a parameter-efficient adapter alone (PEFT)
        instead of merging it into its base model, where the component has one. Call it last: it may leave the
        component's modules changed in ways that compute the same function (an adapter merged into its base)."""
        return None


class Truncations:
    """Mixin of components that cut inputs to fit: ``self.truncated[what]`` holds the keys of the distinct items cut
    (KB rows, ``text_key`` hashes), reported by ``counters()`` and kept in the checkpoint, so a resumed run counts the
    same. Put it before the base class: ``class MyGenerator(Truncations, Generator)``."""

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


class Retriever(Component):
    """A retriever: as the prior it reads x and gives p(h|x) ∝ exp(logit); as the posterior it reads x [SEP] y.

    The framework renders the query texts, asks ``encode`` for their representation, ``search`` for each role's
    top-k rows, takes the union (plus the estimator's extra rows) and asks ``score`` for every retriever's logits
    over that union. The same class serves as prior, as posterior, or both (a second instance, by default built
    with the prior's options and so starting from the same weights)."""

    kind: ClassVar[str] = "retriever"
    scores_any_rows: ClassVar[bool] = True
    """Whether ``score`` accepts any KB rows; False: only the rows its own ``search`` just returned for the same
    queries (then it can be the prior of an estimator that needs no posterior and adds no rows, nothing else)."""

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> Any:
        """Return the queries' representation (e.g. (B, d) vectors), with gradient when the retriever trains."""

    @abc.abstractmethod
    def search(self, queries: Any, k: int, train: bool) -> torch.Tensor:
        """Return (B, k') long KB rows of each query's best passages, best first, -1 padded (k' ≥ k allowed in
        training, e.g. extra candidates from another source; exactly the top k at evaluation)."""

    @abc.abstractmethod
    def score(self, queries: Any, rows: torch.Tensor) -> torch.Tensor:
        """Return (B, C) logits of the given (B, C) KB rows, with gradient when the retriever trains; -inf on -1."""

    def passage_index(self) -> PassageIndex | None:
        """Return the passage index this retriever searches (``Context.passage_index``'s), None if it uses none."""
        return None


class Index(Component):
    """Nearest-neighbour search over the KB's (P, d) passage vectors, built once and cached by the framework."""

    kind: ClassVar[str] = "index"
    Options: ClassVar[type[Options]] = IndexOptions
    sharded: ClassVar[bool] = False
    """Whether each rank holds only part of the vectors, making ``search`` a collective every rank must call as
    often as the others (the training loop and evaluation do); every rank then calls ``build`` and ``save`` (its
    part) too. An index whose sharding is an option sets it on the instance in ``__init__``."""

    @abc.abstractmethod
    def fingerprint_options(self) -> str:
        """Return the options that change what is built (part of the cache key; search-time knobs are not)."""

    @abc.abstractmethod
    def check_vectors(self, count: int, dim: int) -> None:
        """Raise a RecipeError naming the option at fault if this index cannot hold ``count`` vectors of ``dim``."""

    @abc.abstractmethod
    def build(self, vectors: np.ndarray) -> None:
        """Build the index over (P, d) float16 or float32 vectors (usually a read-only memmap: read it in chunks)."""

    @abc.abstractmethod
    def save(self, folder: Path) -> None:
        """Write what ``build`` made into ``folder`` (the framework renames it into the cache when complete)."""

    @abc.abstractmethod
    def load(self, folder: Path) -> None:
        """Read a built index from ``folder`` (which also holds the memory-mapped ``vectors.npy``)."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, rows), each (B, k), best first, for (B, d) float32 queries; rows -1 past the end."""

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """The number of passages indexed (across all ranks when sharded)."""


class Generator(Component):
    """A model of p(y|x,h): scores answers given passages in batches, and decodes answers at evaluation."""

    kind: ClassVar[str] = "generator"

    @abc.abstractmethod
    def score(self, batch: Batch, candidates: Candidates, request: ScoreRequest) -> Scores:
        """Return the token log-likelihoods of the requested (example, passage) pairs' answers, with gradient when
        ``request.grad`` (and the same values with or without it: one scoring law, no dropout)."""

    @abc.abstractmethod
    def generate(self, batch: Batch, candidates: Candidates) -> list[str]:
        """Return one decoded answer per example, given the prior's ranked candidates (every rank calls this)."""

    def tokens(self) -> tuple[int, int]:
        """Return the padded tokens scored so far: in all, and in forwards that carry gradient (0, 0: not counted)."""
        return 0, 0


class Estimator(Component):
    """Turns the generator's scores of sampled pairs into a loss for the micro-batch."""

    kind: ClassVar[str] = "estimator"
    needs_posterior: ClassVar[bool] = False
    """Whether the run must build a posterior q(h|x,y) and pass its logits in ``Candidates.posterior_logits``."""
    adds_rows: ClassVar[bool] = False
    """Whether ``extra_rows`` may name rows the retrievers did not return (a sampler's cached state, say)."""
    needs_all_candidates: ClassVar[bool] = False
    """Whether every KB passage must be a candidate (``candidates.mode: all``), as exact enumeration needs."""
    objective: ClassVar[str] = ""
    """One line: what the estimator's gradient estimates (for reports and gradient studies)."""

    def extra_rows(self, batch: Batch) -> list[list[int]]:
        """Return, per example, KB rows the candidate set must include (only when ``adds_rows``)."""
        return [[] for _ in batch.examples]

    @abc.abstractmethod
    def sample(self, batch: Batch, candidates: Candidates) -> ScoreRequest:
        """Choose the (example, candidate) pairs whose answer likelihood the generator must score."""

    @abc.abstractmethod
    def update(self, batch: Batch, candidates: Candidates, request: ScoreRequest, scores: Scores,
               rescore: Rescore) -> StepResult:
        """Form the micro-batch's loss from the scores; call ``rescore`` for a second, gradient-carrying pass."""

    @property
    def likelihood(self) -> Likelihood | None:
        """How this estimator forms log p(y|x,h) (None: it uses token log-likelihoods as they are)."""
        return self.options.likelihood if isinstance(self.options, EstimatorOptions) else None


class Observer(Component):
    """Watches the run (progress, logs, trackers, reports) through the lifecycle events and the hook points."""

    kind: ClassVar[str] = "observer"

    def on_hook(self, name: str, batch: Batch, result: Any) -> None:
        """Watch a hook point's answer (``retrieve``, ``sample``, ``score``, ``update``): read it, never change it."""


BASES: dict[str, type[Component]] = {"retriever": Retriever, "index": Index, "generator": Generator,
                                     "estimator": Estimator, "observer": Observer}
"""The base class of each kind of component."""
