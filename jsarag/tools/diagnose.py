"""``jsarag diagnose grad-variance``: each estimator's gradient against the exact one, for one model state and batch.

The recipe's models are built as they are (no training step, no DeepSpeed engine) and put in eval mode (no dropout),
and one batch is fixed: the first ``train.batch_size`` examples of the train split. The ``exact`` estimator gives the
reference gradient g of ``-log p(y|x)`` over the whole KB (plus the inclusive KL for the posterior). Each estimator
under study runs N independent draws (``torch.manual_seed(train.seed + draw)``, its state reset, so a sampler's
cache starts empty each time) through the same hook points as a training step (``jsarag.loop.micro_step``), and its
gradient g_i is taken with plain autograd for each trainable module (``generator``, ``prior``, ``posterior``, ...):

    bias              = ‖mean_i g_i - g‖ / ‖g‖      (Monte-Carlo noise adds about bias_noise_floor = sqrt(rel. var / N))
    relative_variance = Σ_i ‖g_i - mean g‖² / (N - 1) / ‖g‖²
    cost_tokens       = padded tokens through the generator per draw (forwards with and without gradient)

Two regimes for an estimator that keeps state between steps (its ``state_dict`` changes over a step: jsa's chain
cache): **fresh**, its state reset before every draw (a chain starts from its first proposal), and **cached**, as in
training: ``--warmup`` micro-steps on the same batch first (no gradient taken) fill the state, and then every draw
continues from the state the previous one left (a chain starts from its cached state). The cached entries are
labelled ``LABEL@cached``; an estimator without such state has only the fresh entry.

Candidate sets: ``exact`` scores every passage (``candidates.mode: all``). Every other estimator is measured under the
recipe's own ``candidates.mode``, as it would train: one without ``needs_posterior`` (rag) sees the prior's top-k only;
one with it (vrag, jsa) the union with the posterior's top-k. ``candidates.mode=all`` measures all of them over the
whole KB (the estimators' own bias, without truncation). rag and vrag optimise other objectives than ``log p(y|x)``
(the top-K marginal, the ELBO): their bias is by design, and each estimator's declared ``objective`` says so.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import yaml
from pydantic import ValidationError

from jsarag.api import Batch, Estimator, EstimatorOptions, Example, Generator, Options
from jsarag.errors import DataError, RecipeError
from jsarag.plugins import Plugins
from jsarag.recipe import ComponentSpec, DeepSpeedSection, Recipe, load_recipe, parse_yaml

if TYPE_CHECKING:
    from jsarag.run import Run

REFERENCE = "exact"  # the estimator whose gradient the others are compared with (every passage scored)
Groups = dict[str, list[torch.nn.Parameter]]  # trainable module name -> its parameters that need gradient


@dataclass(frozen=True)
class Study:
    """One estimator to measure: its label in the report, its registered name, its validated options."""

    label: str
    name: str
    options: Options


@dataclass
class Moments:
    """Running mean and summed squared deviation (Welford) of one gradient vector over draws."""

    n: int = 0
    mean: torch.Tensor | None = None  # (P,) float64
    m2: float = 0.0  # Σ_i ‖g_i - mean‖²
    norm_sum: float = 0.0  # Σ_i ‖g_i‖

    def add(self, grad: torch.Tensor) -> None:
        """Fold in one draw's gradient (P,) float64."""
        self.n += 1
        self.mean = torch.zeros_like(grad) if self.mean is None else self.mean
        delta = grad - self.mean
        self.mean += delta / self.n
        self.m2 += float(delta @ (grad - self.mean))
        self.norm_sum += float(grad.norm())


@dataclass
class Measured:
    """What N draws of one estimator gave."""

    moments: dict[str, Moments]
    tokens: list[int] = field(default_factory=list)  # generator tokens per draw
    tokens_with_grad: list[int] = field(default_factory=list)  # of which in forwards that carry gradient
    seconds: list[float] = field(default_factory=list)
    stats: list[dict[str, float]] = field(default_factory=list)  # the estimator's own step statistics
    candidates_per_example: float = 0.0


# -- the command ----------------------------------------------------------------------------------------------------

def grad_variance(config: Path, overrides: Sequence[str], estimators: str, draws: int, out: Path | None,
                  checkpoints: Path | None = None, warmup: int = 10) -> dict:
    """Measure each estimator's gradient bias, variance and cost; write the JSON report and print a Markdown table.

    With ``checkpoints`` (a run's output_dir), measure at the models as built (step 0) and at each of its checkpoints.
    """
    if draws < 2:
        raise RecipeError(f"--draws {draws}: the variance needs at least 2 draws")
    if warmup < 0:
        raise RecipeError(f"--warmup {warmup}: give 0 (fresh chains only) or more warm-up micro-steps")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("diagnose grad-variance runs in one process: launch it without `deepspeed --num_gpus`")
    plugins = Plugins()
    pairs = parse_estimators(estimators)
    recipe_overrides, given = split_overrides(overrides, [label for label, _ in pairs])
    recipe = load_recipe(config, recipe_overrides, plugins)
    studies = [Study(label, name, estimator_options(name, label, given[label], recipe, plugins))
               for label, name in pairs]
    reference = next((s for s in studies if s.name == REFERENCE), None) or \
        Study(REFERENCE, REFERENCE, estimator_options(REFERENCE, REFERENCE, {}, recipe, plugins))
    check_kb_size(recipe, reference.options)
    sweep = checkpoint_tags(checkpoints) if checkpoints is not None else None
    report = study_run(recipe, reference, studies, draws, sweep, warmup)
    path = out or recipe.output_dir / "grad_variance.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    if sweep is None:
        print(markdown(report))
    else:
        from jsarag.tools.plots import gradient_sweep_plots

        print("\n\n".join(f"### step {entry['step']}\n\n" + markdown(entry) for entry in report["steps"]))
        for plot in gradient_sweep_plots(path.with_suffix(""), report):
            print(f"plot: {plot}")
    print(f"\nwritten to {path}")
    return report


def study_run(recipe: Recipe, reference: Study, studies: list[Study], draws: int,
              sweep: list[tuple[int, Path]] | None = None, warmup: int = 0) -> dict:
    """Build the run once; measure every study at the models as built, or at each (step, checkpoint) of ``sweep``."""
    from jsarag.engine import module_tree
    from jsarag.run import build_run, trainables

    run = build_run(reference_recipe(recipe, reference.options), engine=False)
    groups = trainable_groups(run)
    examples = fixed_batch(recipe, run)
    if sweep is None:
        return study_once(recipe, run, reference, studies, draws, groups, examples, warmup)
    modules = module_tree(trainables(run))  # the engine's module tree: the keys of its checkpoints
    initial = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    steps = []
    for step, folder in [(0, None), *sweep]:
        missing = load_weights(modules, folder, initial)
        entry = study_once(recipe, run, reference, studies, draws, groups, examples, warmup)
        steps.append({"step": step, "checkpoint": str(folder) if folder else None, "not_in_checkpoint": missing,
                      **entry})
    return {"settings": steps[0]["settings"], "steps": steps}


def checkpoint_tags(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, by step."""
    root = Path(output_dir) / "checkpoints"
    found = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.is_dir()
                   and p.name.split("-")[1].isdigit())
    if not found:
        raise RecipeError(f"--checkpoints {output_dir}: no complete checkpoint in {root} (set train.checkpoint_every "
                          "and train.keep_checkpoints high enough in the run to study)")
    return found


def load_weights(modules: torch.nn.ModuleDict, folder: Path | None, initial: dict[str, torch.Tensor]) -> list[str]:
    """Load a checkpoint's weights (ZeRO 0-2: its model states file) into ``modules``, or ``initial`` for None;
    return the parameter names the checkpoint did not have (they keep their initial values)."""
    if folder is None:
        modules.load_state_dict(initial)
        return []
    states = Path(folder) / "mp_rank_00_model_states.pt"
    if not states.exists() or any(Path(folder).glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
        raise RecipeError(f"{folder}: diagnose reads ZeRO 0-2 checkpoints (one model states file); convert a ZeRO-3 "
                          "one with DeepSpeed's zero_to_fp32.py first")
    saved = torch.load(states, map_location="cpu", weights_only=True)["module"]
    missing = sorted(set(initial) - set(saved))
    modules.load_state_dict({**initial, **{k: v for k, v in saved.items() if k in initial}})
    return missing


def study_once(recipe: Recipe, run: Run, reference: Study, studies: list[Study], draws: int, groups: Groups,
               examples: list[Example], warmup: int = 0) -> dict:
    """Take the exact gradient at the run's current weights and measure every study against it (an estimator with
    state in both regimes: fresh, and cached after ``warmup`` micro-steps)."""
    mode = recipe.candidates.mode
    exact = measure(run, run.estimator, examples, groups, 1, "all", recipe.train.seed)
    gradient = {name: m.mean for name, m in exact.moments.items()}
    results = {}
    for study in studies:
        estimator = run.new_estimator(study.name, study.options)
        study_mode = "all" if study.name == REFERENCE else mode
        measured = measure(run, estimator, examples, groups, draws, study_mode, recipe.train.seed)
        results[study.label] = summarise(study, estimator, measured, gradient,
                                         describe_mode(run, study_mode, estimator))
        results[study.label]["target"] += likelihood_note(study, reference)
        if warmup and study.name != REFERENCE:
            estimator = run.new_estimator(study.name, study.options)
            cached = measure(run, estimator, examples, groups, draws, study_mode, recipe.train.seed, warmup)
            if cached is not None:
                entry = summarise(study, estimator, cached, gradient, describe_mode(run, study_mode, estimator))
                entry["target"] += likelihood_note(study, reference)
                results[f"{study.label}@cached"] = {**entry, "regime": f"cached (after {warmup} warm-up steps)"}
    settings = describe_settings(recipe, run, reference, examples, groups, draws, exact)
    settings["warmup"] = warmup
    return {"settings": settings, "exact_norms": {g: float(v.norm()) for g, v in gradient.items()},
            "estimators": results}


# -- parsing --------------------------------------------------------------------------------------------------------

def parse_estimators(text: str) -> list[tuple[str, str]]:
    """Split ``rag,vrag_mc:vrag,jsa`` into (label, estimator name) pairs; ``label:name`` measures a name twice."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            label, _, name = item.rpartition(":")
            pairs.append((label.strip() or name.strip(), name.strip()))
    if not pairs:
        raise RecipeError("--estimators: name at least one estimator, e.g. --estimators rag,vrag,jsa,exact")
    labels = [label for label, _ in pairs]
    for label in labels:
        if labels.count(label) > 1:
            raise RecipeError(f"--estimators: '{label}' appears twice; label repeats as LABEL:NAME (vrag_mc:vrag)")
        if label in Recipe.model_fields:
            raise RecipeError(f"--estimators: the label '{label}' is a recipe section; pick another (LABEL:NAME)")
    return pairs


def split_overrides(overrides: Sequence[str], labels: list[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Separate recipe overrides from estimator options (``LABEL.key=value``, the value parsed as YAML)."""
    recipe_overrides: list[str] = []
    options: dict[str, dict[str, Any]] = {label: {} for label in labels}
    for item in overrides:
        key, sep, text = item.partition("=")
        head, _, rest = key.strip().partition(".")
        if not (sep and head in options and rest):
            recipe_overrides.append(item)
            continue
        try:
            options[head][rest] = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"option '{item}': the value is not valid YAML: {exc}") from None
    return recipe_overrides, options


def estimator_options(name: str, label: str, given: dict[str, Any], recipe: Recipe, plugins: Plugins) -> Options:
    """The recipe's options when it uses this estimator (else defaults), its likelihood, then ``LABEL.key`` options."""
    schema = plugins.component("estimator", name).cls.Options
    values = recipe.estimator.options.model_dump(exclude_unset=True) if recipe.estimator.name == name else {}
    if issubclass(schema, EstimatorOptions):
        values.setdefault("likelihood", likelihood_of(recipe))
    values.update(given)
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join([label, *map(str, err["loc"])])
        if err["type"] == "extra_forbidden":
            raise RecipeError(f"{key}: unknown option of estimator '{name}' (valid: "
                              f"{', '.join(sorted(schema.model_fields)) or 'none'})") from None
        raise RecipeError(f"{key}: {err['msg']}, got {err.get('input')!r}") from None


def likelihood_note(study: Study, reference: Study) -> str:
    """A warning when an estimator scores answers with another likelihood than the exact reference."""
    mine, exact = _likelihood(study.options), _likelihood(reference.options)
    if mine is None or mine == exact:
        return ""
    return f" (NB: likelihood {mine} against the reference's {exact}: another objective, bias expected)"


def likelihood_of(recipe: Recipe) -> str:
    """The recipe estimator's generator likelihood ('sum' or 'mean'), shared by every estimator measured."""
    return _likelihood(recipe.estimator.options) or "sum"


def _likelihood(options: Options) -> str | None:
    """An estimator's likelihood option, None for one that takes no sum/mean choice."""
    return options.likelihood if isinstance(options, EstimatorOptions) else None


# -- the run --------------------------------------------------------------------------------------------------------

def check_kb_size(recipe: Recipe, exact_options: Options) -> None:
    """Refuse, before building anything, a KB too large for the exact gradient (``exact.max_passages``)."""
    from jsarag.kb import load_kb

    kb = load_kb(recipe.data.kb_source())
    if len(kb) > exact_options.max_passages:
        raise RecipeError(
            f"diagnose grad-variance compares with the exact gradient, which scores every passage for every example: "
            f"the KB {kb.path} has {len(kb)} passages > exact.max_passages={exact_options.max_passages}; point "
            f"data.dir at a small KB (a few dozen passages: jsarag data subset) or raise the bound with "
            f"exact.max_passages={len(kb)}")


def reference_recipe(recipe: Recipe, exact_options: Options) -> Recipe:
    """The recipe with the exact estimator (so the run builds a posterior) and every passage a candidate."""
    every_passage = recipe.candidates.model_copy(update={"mode": "all"})
    return recipe.model_copy(update={"estimator": ComponentSpec(name=REFERENCE, options=exact_options),
                                     "candidates": every_passage,
                                     # one process, no engine: ZeRO-3 would leave the models partitioned and unhooked
                                     "deepspeed": DeepSpeedSection(config="zero0.json")})


def trainable_groups(run: Run) -> Groups:
    """Every trainable module's parameters by label (the role, or role.name when a role trains several modules),
    all modules in eval mode (no dropout)."""
    from jsarag.run import trainables

    groups: Groups = {}
    for role, modules in trainables(run).items():
        for name, trainable in modules.items():
            trainable.module.eval()
            groups[role if len(modules) == 1 else f"{role}.{name}"] = [p for p in trainable.module.parameters()
                                                                       if p.requires_grad]
    return groups


def fixed_batch(recipe: Recipe, run: Run) -> list[Example]:
    """The first ``train.batch_size`` examples of the train split."""
    examples, size = run.train_set, recipe.train.batch_size
    if len(examples) < size:
        raise DataError(f"{examples.path}: {len(examples)} examples cannot fill a batch of train.batch_size={size}")
    return list(examples[:size])


# -- measuring ------------------------------------------------------------------------------------------------------

def measure(run: Run, estimator: Estimator, examples: list[Example], groups: Groups, draws: int, mode: str,
            seed: int, warmup: int = 0) -> Measured | None:
    """Run ``draws`` micro-steps of ``estimator`` and fold their gradients into moments: each from the estimator's
    initial state (``warmup`` 0: fresh), or, after ``warmup`` micro-steps without gradient, each continuing from the
    state the one before left (cached; None when the warm-up left the estimator's state as it was: it keeps none)."""
    measured = Measured(moments={group: Moments() for group in groups})
    initial = estimator.state_dict()
    generator = run.generator
    candidates = run.candidates_config.model_copy(update={"mode": mode})
    with run.using(estimator=estimator, candidates=candidates):
        measured.candidates_per_example = candidate_count(run, examples)
        if warmup and not warm_up(run, estimator, examples, warmup, seed, initial):
            return None
        for draw in range(draws):
            if not warmup:
                estimator.load_state_dict(initial)
            torch.manual_seed(seed + draw)
            tokens, start = token_counts(generator), time.perf_counter()
            grads, stats = draw_gradient(run, examples, groups)
            measured.seconds.append(time.perf_counter() - start)
            after = token_counts(generator)
            measured.tokens.append(after[0] - tokens[0])
            measured.tokens_with_grad.append(after[1] - tokens[1])
            measured.stats.append(stats)
            for group, grad in grads.items():
                measured.moments[group].add(grad)
    return measured


def warm_up(run: Run, estimator: Estimator, examples: list[Example], steps: int, seed: int,
            initial: dict[str, Any]) -> bool:
    """Run ``steps`` micro-steps without gradient (seeds apart from the draws'); tell whether they changed the state
    (an estimator whose first step leaves it unchanged keeps none: the rest are skipped)."""
    from jsarag.loop import micro_step

    for step in range(steps):
        torch.manual_seed(seed - 1 - step)
        with torch.no_grad():
            micro_step(run, Batch(examples=list(examples), positions=list(range(len(examples)))))
        if step == 0 and same_state(estimator.state_dict(), initial):
            return False
    return True


def same_state(a: Any, b: Any) -> bool:
    """Whether two state dicts (tensors, plain values, nested) are equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def draw_gradient(run: Run, examples: list[Example], groups: Groups) -> tuple[dict[str, torch.Tensor], dict]:
    """One micro-step's loss through the four hooks; each group's gradient flattened (float64, CPU), the stats."""
    from jsarag.loop import micro_step

    result = micro_step(run, Batch(examples=list(examples), positions=list(range(len(examples)))))
    params = [p for group in groups.values() for p in group]
    if result.loss.requires_grad:
        grads = torch.autograd.grad(result.loss, params, allow_unused=True)
    else:
        grads = (None,) * len(params)
    flat, start = {}, 0
    for name, group in groups.items():
        parts = [torch.zeros(p.numel()) if g is None else g.detach().reshape(-1).cpu()
                 for p, g in zip(group, grads[start : start + len(group)])]
        flat[name], start = torch.cat(parts).double(), start + len(group)
    return flat, dict(result.stats)


def token_counts(generator: Generator) -> tuple[int, int]:
    """Padded tokens the generator has scored so far: in all, and in forwards with gradient (0, 0 if not counted)."""
    return generator.tokens()


@torch.no_grad()
def candidate_count(run: Run, examples: list[Example]) -> float:
    """Mean number of candidate passages per example in the current mode."""
    candidates = run.retrieve(Batch(list(examples), list(range(len(examples)))))
    return float(candidates.mask.sum(-1).float().mean())


# -- the report -----------------------------------------------------------------------------------------------------

def summarise(study: Study, estimator: Estimator, measured: Measured, exact: dict[str, torch.Tensor],
              candidates: str) -> dict:
    """The report entry of one estimator: per group bias, relative variance, norms and cost."""
    cost = mean(measured.tokens) if any(measured.tokens) else None
    stats = {k: mean([s[k] for s in measured.stats if k in s]) for k in sorted({k for s in measured.stats for k in s})}
    return {
        "estimator": study.name,
        "regime": "fresh",
        "options": study.options.model_dump(mode="json"),
        "target": estimator.objective or "(the estimator declares no objective)",
        "candidates": candidates,
        "candidates_per_example": measured.candidates_per_example,
        "cost_tokens": cost,
        "cost_tokens_with_grad": mean(measured.tokens_with_grad) if cost is not None else None,
        "seconds_per_draw": mean(measured.seconds),
        "stats": stats,
        "groups": {g: group_summary(m, exact[g], cost) for g, m in measured.moments.items()},
    }


def group_summary(moments: Moments, exact: torch.Tensor, cost: float | None) -> dict[str, Any]:
    """Bias, its Monte-Carlo noise floor, relative variance, cosine and norms of one group's gradient."""
    exact_norm, mean_norm = float(exact.norm()), float(moments.mean.norm())
    variance = max(moments.m2, 0.0) / (moments.n - 1)
    scale = exact_norm if exact_norm > 0 else math.nan
    bias, noise = float((moments.mean - exact).norm()) / scale, math.sqrt(variance / moments.n) / scale
    return {
        "bias": bias,
        "bias_noise_floor": noise,
        "bias_corrected": math.sqrt(max(bias**2 - noise**2, 0.0)),
        "relative_variance": variance / scale**2,
        "cosine": float(moments.mean @ exact) / (mean_norm * scale) if mean_norm > 0 else None,
        "grad_norm_mean": moments.norm_sum / moments.n,
        "mean_grad_norm": mean_norm,
        "exact_norm": exact_norm,
        "cost_tokens": cost,
        "trained": mean_norm > 0 or variance > 0,
    }


def describe_mode(run: Run, mode: str, estimator: Estimator) -> str:
    """The candidate set an estimator is measured over, in words."""
    if mode == "all":
        return f"all {len(run.ctx.kb)} passages"
    config = run.candidates_config
    text = f"prior top-{config.prior_top_k}"
    if estimator.needs_posterior:
        text += f" ∪ posterior top-{config.posterior_top_k}"
    return text


def describe_settings(recipe: Recipe, run: Run, reference: Study, examples: list[Example], groups: Groups,
                      draws: int, exact: Measured) -> dict[str, Any]:
    """The settings a reader needs to reproduce and interpret the numbers."""
    return {
        "recipe_source": recipe.source,
        "batch_size": len(examples),
        "example_ids": [ex.id for ex in examples],
        "draws": draws,
        "seed": recipe.train.seed,
        "kb_size": len(run.ctx.kb),
        "kb": str(run.ctx.kb.path),
        "likelihood": _likelihood(reference.options) or "sum",
        "recipe_candidates": recipe.candidates.mode,
        "reference": {"estimator": REFERENCE, "candidates": f"all {len(run.ctx.kb)} passages",
                      "cost_tokens": mean(exact.tokens) or None, "stats": exact.stats[0]},
        "groups": {name: sum(p.numel() for p in params) for name, params in groups.items()},
        "device": str(run.ctx.device),
        "method": [
            "one model state (the recipe's models as built, eval mode: no dropout) and one batch (the first "
            "train.batch_size examples of the train split)",
            "exact: every passage a candidate; other estimators: the recipe's candidates.mode, with the "
            "posterior's candidates only for estimators that need a posterior (as in a run of that estimator)",
            "draw d seeds torch with train.seed + d; fresh: from the estimator's initial state (an empty cache); "
            "LABEL@cached: after `warmup` micro-steps without gradient, each draw continues from the state the "
            "previous draw left (as in training, where a chain starts from its cached state)",
            "gradients by torch.autograd.grad per trainable module; variance with N - 1 in the denominator",
        ],
        "definitions": {
            "bias": "‖mean g - g_exact‖ / ‖g_exact‖ (includes Monte-Carlo noise of about bias_noise_floor)",
            "bias_noise_floor": "sqrt(variance / draws) / ‖g_exact‖: the bias an unbiased estimator shows by chance",
            "bias_corrected": "sqrt(max(bias² - bias_noise_floor², 0)): the bias with the Monte-Carlo part removed",
            "relative_variance": "Σ ‖g_i - mean g‖² / (draws - 1) / ‖g_exact‖²",
            "cosine": "cos(mean g, g_exact)",
            "grad_norm_mean": "mean over draws of ‖g_i‖",
            "cost_tokens": "padded tokens through the generator per draw (forwards with and without gradient)",
            "cost_tokens_with_grad": "of cost_tokens, those in forwards that carry gradient (a backward follows)",
        },
    }


def markdown(report: dict) -> str:
    """The report as a Markdown table, with what each estimator's gradient estimates below it."""
    s = report["settings"]
    lines = [
        f"Gradient bias and variance against `exact` ({s['kb_size']} passages, batch {s['batch_size']}, "
        f"{s['draws']} draws, likelihood {s['likelihood']}, seed {s['seed']}; exact costs "
        f"{_num(s['reference']['cost_tokens'])} tokens). bias = ‖E g − g_exact‖/‖g_exact‖; noise = its Monte-Carlo "
        "part sqrt(var/N)/‖g_exact‖; corrected = sqrt(bias² − noise²); rel. var = E‖g − E g‖²/‖g_exact‖².",
        "",
        "| estimator | group | candidates | bias | noise | corrected | rel. var | cosine | mean ‖g‖ | ‖g_exact‖ "
        "| tokens/draw (grad) | s/draw |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, entry in report["estimators"].items():
        tokens = f"{_num(entry['cost_tokens'])} ({_num(entry['cost_tokens_with_grad'])})"
        for group, g in entry["groups"].items():
            keys = ("bias", "bias_noise_floor", "bias_corrected", "relative_variance", "cosine")
            values = [_num(g[k]) for k in keys] if g["trained"] else ["not trained", "", "", "", ""]
            lines.append(f"| {label} | {group} | {entry['candidates']} ({entry['candidates_per_example']:.1f}) | "
                         + " | ".join(values) + f" | {_num(g['grad_norm_mean'])} | {_num(g['exact_norm'])} | "
                         f"{tokens} | {entry['seconds_per_draw']:.2f} |")
    lines.append("")
    lines += [f"- {label}: {entry['target']}" for label, entry in report["estimators"].items()]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1e5 else f"{value:.3e}"


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (0 for no values)."""
    return float(sum(values) / len(values)) if values else 0.0
