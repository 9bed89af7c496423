"""YAML recipes into a validated, typed ``Recipe``.

A recipe is a YAML file (read with ``yaml.safe_load`` only) that may ``extends:`` a base recipe (path relative to
the file) and is then overridden by ``key=value`` pairs from the command line (dotted keys, values parsed as YAML).
Each component section ``{name: ..., <options>}`` is checked against the chosen plugin's own ``Options`` schema,
and the chosen components against each other and their kinds' contracts (``jsarag.api``), before anything loads.
Changing a section's ``name`` (in a child recipe or an override) starts that section afresh: the options of the
old plugin do not carry over. Errors name the key, the file and line it came from, and a close match.

The ``posterior`` section is the posterior role q(h|x,y): ``copy`` (the default) builds a second instance of the
``retriever`` section's plugin with its options (so it starts from the same weights); a mapping without a new
``name`` does the same with some options changed; a mapping with another ``name`` is another plugin; ``prior``
makes the prior itself read ``x [SEP] y`` (shared weights). It is built only for estimators that need it.
A recipe path given by name (``tiny_rag``) is looked up among the recipes packaged with jsarag.
"""
from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jsarag.api import Options, PathOption
from jsarag.data import EXAMPLE_FIELDS, PASSAGE_FIELDS, Source, default_data_dir, field_map, split_path
from jsarag.errors import DataError, RecipeError
from jsarag.paths import plain_name, stays_inside
from jsarag.plugins import Plugins, Registered, check_class

COMPONENT_SECTIONS = ("retriever", "posterior", "index", "generator", "estimator")
KIND_OF = {"retriever": "retriever", "posterior": "retriever", "index": "index", "generator": "generator",
           "estimator": "estimator"}
DEFAULT_INDEX = {"name": "faiss"}
MOVED = {  # keys of earlier versions -> where they live now
    "retriever.top_k": "candidates.prior_top_k", "retriever.posterior_top_k": "candidates.posterior_top_k",
    "retriever.candidates": "candidates.mode", "retriever.posterior_sep": "candidates.posterior_sep",
    "retriever.posterior_lr": "posterior.lr", "retriever.share_posterior": "posterior: prior",
    "index.refresh": "retriever.refresh", "train.log_every": "observers: [{name: progress, log_every: N}, ...]",
}
Origins = dict[str, str]  # dotted key -> "file line N" or "command line"
MAX_DEPTH = 64  # nesting of mappings and lists a recipe may have (deeper is an error, not a RecursionError)
MAX_VALUES = 100_000  # keys and values of a recipe once YAML aliases are expanded (a "billion laughs" file)
MAX_EXTENDS = 32  # recipes in one ``extends`` chain
MAX_SHOWN = 200  # characters of a bad value quoted in an error
MAX_BYTES = 1 << 20  # size of a recipe file


class Section(BaseModel):
    """A fixed part of the recipe: unknown keys are errors; numbers must be finite numbers, not strings or booleans."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, strict=True, allow_inf_nan=False)


FieldMapping = dict[str, str | None]  # our field -> the source's (dotted for nested values); None: the source has none


class SourceConfig(Section):
    """Where a knowledge base or a split is read from; a plain string in a recipe is its ``path``."""

    path: str
    """A local file (.jsonl or .jsonl.gz, read line by line; .json, .csv, .tsv, .parquet, .arrow), a folder of such
    files, a folder written by save_to_disk, or a hub dataset name (online, or already in the datasets cache)."""
    name: str | None = None
    """The hub dataset's configuration (load_dataset's second argument)."""
    split: str | None = None
    """The source's split to read; null: its only split (under data.examples: the recipe split's own name)."""
    fields: FieldMapping | None = None
    """Our field -> the source's (dotted for nested values, e.g. answers.text; null: the source has none); fields
    not named keep their names. Unset: data.fields for a split, the same names for passages."""

    def to_source(self, fields: FieldMapping, split: str | None = None) -> Source:
        """The ``jsarag.data.Source`` this section names, with a field mapping and a split (if not its own)."""
        return Source(self.path, self.name, self.split if self.split is not None else split, fields)


def _source_shorthand(value: Any) -> Any:
    """A source given as a plain string is its path."""
    return {"path": value} if isinstance(value, str) else value


def _check_fields(fields: FieldMapping | None, ours: tuple[str, ...]) -> None:
    """Refuse a field mapping with an unknown field or a required field mapped to null (as a ValueError)."""
    if fields is not None:
        try:
            field_map(fields, ours)
        except DataError as err:
            raise ValueError(str(err)) from None


class DataConfig(Section):
    dir: PathOption | None = None
    """Folder in the data layout (passages.jsonl, <split>.jsonl[.gz]); null = the embedded dataset named below."""
    embedded: Literal["doqa_cooking", "squad_v1.1"] = "doqa_cooking"
    """The dataset shipped with jsarag that a recipe without data.dir reads: DoQA cooking (dialog) or SQuAD v1.1."""
    passages: SourceConfig | None = None
    """The knowledge base from any source the datasets library reads (fields: id, title, text); null: <dir>/passages."""
    examples: SourceConfig | None = None
    """Every split from one source holding several (a hub dataset, a folder, a save_to_disk DatasetDict), each read
    from the source's split of its name (dev also finds validation); null: <dir>/<split>.jsonl[.gz]."""
    splits: dict[str, SourceConfig] = {}
    """Split name -> its own source (a file per split, say); these win over data.examples and data.dir."""
    fields: FieldMapping = {}
    """Field mapping of every split without its own (id, context, question, answer, answers, gold_passage_ids; answer:
    null takes the first of answers), data.dir's split files included."""
    train_split: str = "train"
    """Split trained on."""
    eval_splits: list[str] = ["dev"]
    """Splits evaluated during and after training."""
    drop_unanswerable: bool = True
    """Drop examples whose answer is CANNOTANSWER (they ground on no passage)."""
    max_history_turns: int = Field(2, ge=0)
    """Earlier dialog turns kept in the retriever query and the generator prompt."""
    on_error: Literal["raise", "skip"] = "raise"
    """A malformed example line: stop with its file and line, or skip and count it."""

    @field_validator("train_split")
    @classmethod
    def _plain_split(cls, value: str) -> str:
        return plain_name(value)

    @field_validator("eval_splits")
    @classmethod
    def _plain_splits(cls, value: list[str]) -> list[str]:
        return [plain_name(split) for split in value]

    @field_validator("passages", "examples", mode="before")
    @classmethod
    def _one_source(cls, value: Any) -> Any:
        return _source_shorthand(value)

    @field_validator("splits", mode="before")
    @classmethod
    def _split_sources(cls, value: Any) -> Any:
        return {k: _source_shorthand(v) for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("passages")
    @classmethod
    def _passage_fields(cls, value: SourceConfig | None) -> SourceConfig | None:
        _check_fields(value.fields if value else None, PASSAGE_FIELDS)
        return value

    @field_validator("examples")
    @classmethod
    def _examples_source(cls, value: SourceConfig | None) -> SourceConfig | None:
        if value is not None and value.split is not None:
            raise ValueError("data.examples reads each split from the source's split of the same name; give a split "
                             "read from elsewhere its own source under data.splits")
        _check_fields(value.fields if value else None, EXAMPLE_FIELDS)
        return value

    @field_validator("splits")
    @classmethod
    def _split_names(cls, value: dict[str, SourceConfig]) -> dict[str, SourceConfig]:
        for name, source in value.items():
            plain_name(name)
            _check_fields(source.fields, EXAMPLE_FIELDS)
        return value

    @field_validator("fields")
    @classmethod
    def _example_fields(cls, value: FieldMapping) -> FieldMapping:
        _check_fields(value, EXAMPLE_FIELDS)
        return value

    def folder(self) -> Path:
        """The data folder: data.dir, else the embedded dataset's."""
        return self.dir or default_data_dir(self.embedded)

    def kb_source(self) -> Path | Source:
        """Where the knowledge base is read from: data.passages, else <data.dir>/passages.jsonl[.gz]."""
        if self.passages is not None:
            return self.passages.to_source(self.passages.fields or {})
        return split_path(self.folder(), "passages")

    def split_source(self, split: str) -> Path | Source:
        """Where a split is read from: data.splits.<split>, else data.examples, else <data.dir>/<split>.jsonl[.gz]."""
        if split in self.splits:
            source = self.splits[split]
            return source.to_source(self.fields if source.fields is None else source.fields)
        if self.examples is not None:
            fields = self.fields if self.examples.fields is None else self.examples.fields
            return self.examples.to_source(fields, split=split)
        path = split_path(self.folder(), split)
        return Source(path, fields=self.fields) if self.fields else path


class TrainConfig(Section):
    max_steps: int = Field(100, ge=0)
    """Optimizer steps in total."""
    stop_at: int | None = Field(None, ge=1)
    """Stop this invocation after this step (checkpointed); a later run with resume: auto goes on."""
    batch_size: int = Field(2, ge=1)
    """Examples per micro-batch on each rank."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seed of initialisation, data order and sampling."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate schedule after warm-up (the warm-up steps come first whatever the schedule)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (a YAML list of two numbers)."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient-norm clipping (0 = off)."""
    eval_every: int = Field(0, ge=0)
    """Steps between evaluations (0 = only at the end)."""
    checkpoint_every: int = Field(0, ge=0)
    """Steps between checkpoints (0 = only at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Complete checkpoints kept on disk."""
    max_nonfinite: int = Field(5, ge=1)
    """Stop after this many non-finite losses in a row (each is skipped and counted)."""
    grace_seconds: float = Field(25.0, ge=0)
    """After SIGINT or SIGTERM: seconds to finish the current step and write a checkpoint before exiting without
    one (keep it under the scheduler's grace period; DeepSpeed's launcher kills its ranks 30 s after a signal)."""

    @field_validator("betas", mode="before")
    @classmethod
    def _list_as_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value  # YAML has lists, not tuples


class EvalConfig(Section):
    max_examples: int | None = Field(200, ge=1)
    """Examples evaluated per split (null = all)."""
    at_start: bool = False
    """Evaluate the untrained model before the first step."""
    batch_size: int = Field(8, ge=1)
    """Examples per evaluation batch on each rank."""
    top_k: int = Field(10, ge=1)
    """Passages the prior ranks for Recall@k and MRR@k."""
    generate: bool = True
    """Decode answers (EM/F1); false = retrieval metrics only."""


class CandidatesConfig(Section):
    prior_top_k: int = Field(10, ge=1)
    """k_p: the prior's top passages that join the training candidates (RAG's K)."""
    posterior_top_k: int = Field(10, ge=1)
    """k_q: the posterior's top passages that join them (for estimators that need a posterior)."""
    mode: Literal["topk", "all"] = "topk"
    """topk: prior top-k_p ∪ posterior top-k_q ∪ the estimator's extra rows; all: every KB passage (small KBs)."""
    posterior_sep: str = " [SEP] "
    """What separates x and y in the posterior's query text."""


class DeepSpeedSection(Section):
    config: str = "zero0.json"
    """A file in ds_configs/ or a path to a DeepSpeed JSON config."""
    overrides: dict[str, Any] = {}
    """Keys merged into that config (e.g. {zero_optimization: {stage: 3}})."""


class ComponentSpec(BaseModel):
    """A chosen plugin component and its validated options."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    options: Options
    shares_prior: bool = False  # the posterior role only: the prior's own instance reads x [SEP] y


class Recipe(Section):
    output_dir: PathOption = Path("runs/default")
    """Where checkpoints, metrics.json and the report go (a relative path may not climb out with '..')."""
    resume: Literal["auto", "never", "force"] = "auto"
    """auto: continue from the latest complete checkpoint in output_dir, if any, when it was written with the same
    recipe (else an error listing the keys that differ); force: also when only train.max_steps, train.eval_every,
    eval.*, observers or data.eval_splits differ; never: refuse an output_dir that holds checkpoints."""
    data: DataConfig = DataConfig()
    retriever: ComponentSpec
    posterior: ComponentSpec
    index: ComponentSpec
    generator: ComponentSpec
    estimator: ComponentSpec
    candidates: CandidatesConfig = CandidatesConfig()
    observers: list[ComponentSpec] = []
    """Observer plugins that watch the run (a name, or a mapping with name and options)."""
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    source: dict[str, Any] = {}
    """The merged recipe as written (for reports); not a key to set."""

    @field_validator("output_dir")
    @classmethod
    def _output_dir_stays_put(cls, value: Path) -> Path:
        return stays_inside(value)

    def resolved(self) -> dict[str, Any]:
        """The recipe as plain data with every default filled in (each component's options by its own schema)."""
        return self.model_dump(mode="json", exclude={"source"}, serialize_as_any=True)


def load_recipe(path: str | Path, overrides: list[str] = (), plugins: Plugins | None = None) -> Recipe:
    """Read, merge and validate a recipe file (or a packaged recipe's name) with command-line overrides."""
    raw, origins = _read_with_extends(find_recipe(path), seen=())
    for item in overrides:
        _apply_override(raw, origins, item)
    return validate(raw, origins, plugins or Plugins())


def packaged_recipes() -> dict[str, Path]:
    """The recipes shipped with jsarag (the repository's recipes/ folder, installed as ``jsarag.recipes``), by name."""
    folder = Path(str(resources.files("jsarag.recipes")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_recipe(path: str | Path) -> Path:
    """The recipe file a ``--config`` value names: an existing path, else a packaged recipe by name (``tiny_rag``)."""
    given = Path(path)
    if _exists(given) or given.parent != Path("."):
        return given
    packaged = packaged_recipes()
    name = given.name.removesuffix(".yaml")
    if name in packaged:
        return packaged[name]
    raise RecipeError(f"recipe file not found: {given} (nor is '{name}' a packaged recipe: "
                      f"{', '.join(packaged) or 'none'})")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a NUL character, a name too long
        return False


def validate(raw: dict[str, Any], origins: Origins, plugins: Plugins) -> Recipe:
    """Turn a merged recipe dict into a ``Recipe``: every component against its plugin's schema and its kind's
    contract, and the chosen components against each other."""
    if "source" in raw:
        raise RecipeError(f"'source' is not a recipe key ({_where('source', origins)})")
    plain = {k: v for k, v in raw.items() if k not in COMPONENT_SECTIONS and k not in ("source", "observers")}
    for section in ("retriever", "generator", "estimator"):
        if section not in raw:
            raise RecipeError(f"the recipe has no '{section}' section ({_where('', origins)})")
    components = {section: _component(section, _section_value(raw, section, origins), origins, plugins)
                  for section in COMPONENT_SECTIONS}
    components["posterior"].shares_prior = raw.get("posterior") == "prior"
    observers = raw.get("observers", ["progress", "jsonl_log", "report"])
    if not isinstance(observers, list):
        raise RecipeError(f"observers: a list of observer names or {{name: ...}} mappings, got {_shown(observers)} "
                          f"({_where('observers', origins)})")
    chosen = [_component(f"observers.{i}", {"name": o} if isinstance(o, str) else o, origins, plugins, "observer")
              for i, o in enumerate(observers)]
    try:
        recipe = Recipe.model_validate({**plain, **components, "observers": chosen, "source": copy.deepcopy(raw)})
    except ValidationError as exc:
        raise _recipe_error(exc, Recipe, (), origins) from None
    _check_combination(recipe, origins, plugins)
    return recipe


def _section_value(raw: dict[str, Any], section: str, origins: Origins) -> Any:
    """A component section as written, with the defaults of the optional ones: ``index`` is faiss, ``posterior``
    a copy of the ``retriever`` section (a mapping without another ``name`` changes some of its options)."""
    if section == "index":
        return raw.get("index", DEFAULT_INDEX)
    if section != "posterior":
        return raw[section]
    value, prior = raw.get("posterior", "copy"), raw["retriever"]
    if value in ("copy", "prior"):
        return prior
    if isinstance(value, dict) and isinstance(prior, dict) and value.get("name", prior.get("name")) == prior.get("name"):
        for key in prior:  # options the posterior takes from the prior are reported at the prior's lines
            if f"retriever.{key}" in origins:
                origins.setdefault(f"posterior.{key}", origins[f"retriever.{key}"])
        return {**prior, **value}
    if not isinstance(value, dict):
        raise RecipeError(f"posterior: 'copy', 'prior' or a retriever section, got {_shown(value)} "
                          f"({_where('posterior', origins)})")
    return value


def _component(section: str, value: Any, origins: Origins, plugins: Plugins, kind: str | None = None) -> ComponentSpec:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise RecipeError(f"{section} must be a mapping with a 'name' ({_where(section, origins)})")
    registered = _check_plugin(kind or KIND_OF[section], value["name"], f"{section}.name", origins, plugins)
    options = {k: v for k, v in value.items() if k != "name"}
    try:
        return ComponentSpec(name=value["name"], options=registered.cls.Options.model_validate(options))
    except ValidationError as exc:
        raise _recipe_error(exc, registered.cls.Options, (section,), origins, extra_keys=("name",)) from None


def _check_plugin(kind: str, name: str, key: str, origins: Origins, plugins: Plugins) -> Registered:
    known = plugins.registry()[kind]
    if name in known:
        check_class(known[name])
        return known[name]
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise RecipeError(
        f"{key}: unknown {kind} plugin '{name}' ({_where(key, origins)}); registered: "
        f"{', '.join(sorted(known)) or 'none'}{hint}"
    )


def _check_combination(recipe: Recipe, origins: Origins, plugins: Plugins) -> None:
    """Refuse chosen components that cannot work together, naming both (before any model loads)."""
    estimator = plugins.component("estimator", recipe.estimator.name)
    prior = plugins.component("retriever", recipe.retriever.name)
    posterior = plugins.component("retriever", recipe.posterior.name)
    needs = estimator.cls
    where = _where("estimator.name", origins)
    if needs.needs_all_candidates and recipe.candidates.mode != "all":
        raise RecipeError(f"{estimator.describe()} scores every passage: set candidates.mode: all ({where})")
    if not prior.cls.scores_any_rows:
        wants = [why for why, yes in (("a posterior's rows", needs.needs_posterior), ("rows of its own",
                 needs.adds_rows), ("every passage (candidates.mode: all)", recipe.candidates.mode == "all")) if yes]
        if wants:
            raise RecipeError(f"the prior, {prior.describe()}, scores only the rows its own search returned, but "
                              f"{estimator.describe()} needs it to score {' and '.join(wants)}; pick another "
                              f"retriever or estimator ({_where('retriever.name', origins)})")
    if needs.needs_posterior and not posterior.cls.scores_any_rows:
        raise RecipeError(f"{estimator.describe()} needs a posterior that scores the prior's candidates, but the "
                          f"posterior, {posterior.describe()}, scores only the rows its own search returned; pick "
                          f"another posterior ({_where('posterior', origins)})")


def _recipe_error(
    exc: ValidationError, model: type[BaseModel], prefix: tuple[str, ...], origins: Origins, extra_keys=()
) -> RecipeError:
    """Describe the first validation error by key, origin and, for an unknown key, a close match."""
    err = exc.errors()[0]
    loc = prefix + tuple(str(p) for p in err["loc"])
    key = ".".join(loc)
    message = f"{key}: {err['msg']}"
    if err["type"] == "extra_forbidden":
        fields = [f for f in _fields_at(model, err["loc"][:-1]) if f != "source"] + list(extra_keys)
        close = difflib.get_close_matches(str(err["loc"][-1]), fields, n=1)
        message = f"{key}: unknown key" + (f"; did you mean '{'.'.join(loc[:-1] + (close[0],))}'?" if close else "")
        as_prior = "retriever." + ".".join(loc[1:])  # the posterior section takes the retriever's keys
        moved = MOVED.get(key) or (MOVED.get(as_prior) if loc[0] == "posterior" else None)
        if moved:
            message = f"{key}: this key moved to {moved}"
        message += f" (valid here: {', '.join(sorted(fields))})"
    elif err["type"] == "value_error":  # a validator's own message (it quotes the value)
        message = f"{key}: {err['ctx']['error']}"
    elif "input" in err and err["type"] != "missing":
        message += f", got {_shown(err['input'])}"
    return RecipeError(f"{message} ({_where(key, origins)})")


def _shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut to MAX_SHOWN characters."""
    return _cut(repr(value))


def _cut(text: str) -> str:
    """Text cut to MAX_SHOWN characters for an error message."""
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _fields_at(model: type[BaseModel], loc: tuple) -> dict[str, Any]:
    """The fields of the section at ``loc``, through optional sections and mappings of sections (data.splits.dev)."""
    node: Any = model
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel) and str(part) in node.model_fields:
            node = _section_in(node.model_fields[str(part)].annotation)
        elif typing.get_origin(node) is dict:
            node = _section_in(typing.get_args(node)[1])
        else:
            return {}
    return node.model_fields if isinstance(node, type) and issubclass(node, BaseModel) else {}


def _section_in(annotation: Any) -> Any:
    """``X`` for ``X | None``, else the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _where(key: str, origins: Origins) -> str:
    """Return where a dotted key (or its nearest parent) was set."""
    parts = key.split(".") if key else []
    while parts:
        if ".".join(parts) in origins:
            return origins[".".join(parts)]
        parts.pop()
    return origins.get("", "recipe")


# -- reading, extends and overrides ---------------------------------------------------------------------------------

class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build objects or run code), reading ``1e-5`` as a number as YAML 1.2 does."""


EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")  # 1e-5, 2E3: strings in YAML 1.1
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    """Parse YAML text safely (``RecipeLoader``); raises ``yaml.YAMLError``, ``ValueError`` or ``RecursionError``."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _read_with_extends(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], Origins]:
    path = _resolved(path)
    if path in seen:
        raise RecipeError(f"{path}: 'extends' forms a cycle: {' -> '.join(str(p) for p in seen + (path,))}")
    if len(seen) >= MAX_EXTENDS:
        raise RecipeError(f"{path}: more than {MAX_EXTENDS} recipes in one 'extends' chain")
    data, origins = read_yaml(path)
    base = data.pop("extends", None)
    where = origins.pop("extends", str(path))
    if base is None:
        return data, origins
    if not isinstance(base, str) or not base.strip():
        raise RecipeError(f"{where}: 'extends' must be a path to a recipe, got {_shown(base)}")
    target, packaged = path.parent / base, packaged_recipes()
    if not _exists(target) and Path(base).parent == Path(".") and base.removesuffix(".yaml") in packaged:
        target = packaged[base.removesuffix(".yaml")]  # a packaged recipe by name: extends: tiny_rag
    parent, parent_origins = _read_with_extends(target, seen + (path,))
    return _merge(parent, data, parent_origins, origins), {**parent_origins, **origins}


def _resolved(path: Path) -> Path:
    """The absolute form of a recipe path; a path no file system accepts is a RecipeError."""
    try:
        return path.resolve()
    except (OSError, ValueError) as exc:  # a NUL character, a name too long, a symlink loop
        raise RecipeError(f"recipe path {_shown(str(path))} cannot be used: {exc}") from None


def read_yaml(path: Path) -> tuple[dict[str, Any], Origins]:
    """Parse a recipe file safely; return its mapping and the file and line of each dotted key."""
    try:
        text = _read_text(path)
        node = yaml.compose(text, Loader=RecipeLoader)
        data = parse_yaml(text)
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except OSError as exc:
        raise RecipeError(f"{_cut(str(path))}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise RecipeError(f"{path}: malformed YAML: {_unreadable(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    origins: Origins = {"": str(path)}
    _key_lines(node, path, origins)
    _check_values(data, origins)
    return data, origins


def _read_text(path: Path) -> str:
    """The text of a recipe file: a regular file (not a folder, not a device such as /dev/zero) of at most MAX_BYTES."""
    if path.is_dir():
        raise RecipeError(f"{path} is a folder, not a recipe file")
    if path.exists() and not path.is_file():
        raise RecipeError(f"{path} is not a regular file")
    with path.open("rb") as stream:
        data = stream.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_BYTES // 2**20} MiB; not a recipe")
    return data.decode("utf-8-sig")


def _unreadable(exc: Exception) -> str:
    """Say why YAML could not be read: its own error, an integer too long to convert, or nesting too deep."""
    if isinstance(exc, RecursionError):
        return f"nested too deeply (at most {MAX_DEPTH} levels)"
    if not isinstance(exc, yaml.YAMLError):  # e.g. an integer of more than 4300 digits
        return f"a value cannot be converted ({str(exc).split(';')[0]})"
    return str(exc)


def _key_lines(root: yaml.Node | None, path: Path, origins: Origins) -> None:
    """Record the file and line of each dotted key; refuse duplicate or non-string keys and too deep nesting."""
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())] if root is not None else []
    visited: set[int] = set()  # an aliased node (&anchor / *alias) is walked once
    while stack:
        node, prefix = stack.pop()
        if id(node) in visited or not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            continue
        visited.add(id(node))
        line = node.start_mark.line + 1
        if len(prefix) >= MAX_DEPTH:
            raise RecipeError(f"{path} line {line}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, prefix + ("[]",)) for item in node.value)
            continue
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges a mapping in
                stack.append((value_node, prefix))
                continue
            key = ".".join(prefix + (_key_name(key_node, path),))
            if key in seen:
                raise RecipeError(f"{path} line {key_node.start_mark.line + 1}: duplicate key '{key}'")
            seen.add(key)
            origins.setdefault(key, f"{path} line {key_node.start_mark.line + 1}")
            stack.append((value_node, prefix + (str(key_node.value),)))


def _key_name(node: yaml.Node, path: Path) -> str:
    """The text of a mapping key, which must be a plain string (``1:``, ``yes:`` or ``~:`` are not keys here)."""
    if node.tag != "tag:yaml.org,2002:str":
        text = node.value if isinstance(node, yaml.ScalarNode) else "a " + node.id
        raise RecipeError(f"{path} line {node.start_mark.line + 1}: the key {_shown(text)} is not a name; "
                          "keys are words (quote it, e.g. \"on\": ..., if YAML reads it as a number or boolean)")
    return node.value


def _check_values(value: Any, origins: Origins, prefix: str = "") -> None:
    """Refuse what no recipe key takes: nesting deeper than MAX_DEPTH, more than MAX_VALUES values once YAML aliases
    are expanded, strings with a NUL or a lone surrogate (they cannot name files or be written as UTF-8)."""
    stack, count = [(value, prefix)], 0
    while stack:
        item, key = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise RecipeError(f"{_where(key, origins)}: more than {MAX_VALUES} values (with YAML aliases expanded); "
                              "not a recipe")
        if key.count(".") >= MAX_DEPTH:
            raise RecipeError(f"{key}: nested more than {MAX_DEPTH} levels deep ({_where(key, origins)})")
        if isinstance(item, dict):
            stack.extend((child, f"{key}.{name}".lstrip(".")) for name, child in item.items())
        elif isinstance(item, list):
            stack.extend((child, f"{key}.{i}".lstrip(".")) for i, child in enumerate(item))
        elif isinstance(item, str) and not _writable(item):
            raise RecipeError(f"{key or 'value'}: the string {_shown(item)} holds a NUL character or a lone surrogate, "
                              f"which no file name or UTF-8 file can hold ({_where(key, origins)})")


def _writable(text: str) -> bool:
    """Whether a string can be a file name and be written as UTF-8 (no NUL, no lone surrogates)."""
    if "\0" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _merge(base: dict, child: dict, base_origins: Origins, child_origins: Origins, prefix: str = "") -> dict:
    """Deep-merge ``child`` into ``base``; a component section whose name changes is replaced, not merged."""
    out = dict(base)
    for key, value in child.items():
        old = out.get(key)
        renamed = isinstance(value, dict) and isinstance(old, dict) and "name" in value and value["name"] != old.get("name")
        if isinstance(value, dict) and isinstance(old, dict) and not renamed:
            out[key] = _merge(old, value, base_origins, child_origins, f"{prefix}{key}.")
        else:
            out[key] = value
            if renamed:
                _drop_origins(base_origins, f"{prefix}{key}.")
    return out


def _drop_origins(origins: Origins, prefix: str) -> None:
    for key in [k for k in origins if k.startswith(prefix)]:
        del origins[key]


def _apply_override(raw: dict[str, Any], origins: Origins, item: str) -> None:
    """Apply one ``dotted.key=value`` override in place."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError(f"override '{_cut(item)}' must look like dotted.key=value")
    try:
        value = parse_yaml(text) if text.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise RecipeError(f"override '{_cut(item)}': the value is not valid YAML: {_unreadable(exc)}") from None
    _check_values(value, {"": f"command line override '{_cut(item)}'"}, key.strip())
    node = raw
    if parts[0] == "posterior" and len(parts) > 1 and raw.get("posterior") == "copy":
        raw["posterior"] = {}  # a copy of the prior with this option changed
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override '{_cut(item)}': '{'.'.join(parts[:i + 1])}' is not a section")
        node = child
    if parts[-1] == "name" and len(parts) == 2 and parts[0] in COMPONENT_SECTIONS and node.get("name") != value:
        node.clear()  # a different plugin: its options start afresh
        _drop_origins(origins, f"{parts[0]}.")
    node[parts[-1]] = value
    origins[key.strip()] = f"command line override '{_cut(item)}'"
