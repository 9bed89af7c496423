"""``jsarag bench estimators``: the planted-retrieval benchmark. Every estimator learns the same task from the same
start, over several seeds; curves of the prior's Recall@1 and of answer accuracy over training show which one learns.

The task (``jsarag.tools.planted``): one passage per invented person ("oslo is the home of zorvel kabex ."), questions
about their home city, dev questions about other people than the train ones; an answer cannot be produced without
its passage. The start, built once into ``<out>/models``:

- the prior's query encoder is the tiny BERT passage encoder with Gaussian noise on every weight (``--prior-noise``
  times each tensor's standard deviation): its top-4 holds the gold passage for about 1 question in 10, so RAG's
  top-K truncation bites;
- the posterior's (q reads "question [SEP] answer") is a less noisy copy (``--posterior-noise``): it starts better
  than the prior but misses the gold passage for a good share of questions, so whether an estimator trains q to find
  the passages it misses (inclusive KL for jsa, exclusive for vrag), and keeps the ones it found (jsa's cache), shows;
- the generator is the tiny random GPT-2 first taught to read: supervised copying on facts about other invented
  people (none in the KB), 8 a step, until it answers 95% of 200 held-out facts (checked every 100 steps, at most
  ``--reader-steps`` steps), so that p(y|x,h) tells the right passage from the wrong ones; on a finite train set a
  random tiny generator memorises name -> city instead of learning to read.

Each (estimator, seed) is one ordinary ``jsarag train`` run of ``--config`` (``recipes/planted.yaml``), through the
machinery of ``jsarag bench quality`` (subprocess, folder record, reuse of finished runs, resume of unfinished ones),
into ``<out>/<label>/seed<k>``; seed k also draws the encoders' noise. ``exact`` runs over every passage
(``candidates.mode=all``). Writes ``<out>/estimators.json`` (every run's curves, per estimator the mean and sample
standard deviation over seeds at every evaluated step, the settings, the machine), ``<out>/estimators.md`` and
``<out>/estimators.png`` (the curves, mean ± std bands); prints the Markdown. With ``--treatment`` (jsa) among the
estimators, the report adds, per metric at the last step, the treatment minus the best other estimator with a 95%
paired bootstrap interval over the dev questions (``jsarag bench quality``'s ``significance``).

    jsarag bench estimators --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from jsarag.errors import RecipeError
from jsarag.tools import bench_quality as quality
from jsarag.tools.planted import CITIES, PASSAGE, QUESTIONS, invented_names, write_planted

DEFAULT_ESTIMATORS = "rag,vrag,vrag_mc:vrag,jsa,jsa_nocache:jsa,exact"
DEFAULT_OPTIONS = {"vrag_mc": {"samples": 4}, "jsa_nocache": {"cache": False}}  # by label; LABEL.key=value wins
CURVES = {"recall@1": "prior Recall@1", "em": "answer accuracy (EM)"}
TABLE_METRICS = ("recall@1", "recall@10", "em")
PASSAGE_ENCODER = "jsarag/tiny-bert"
READER_BASE = "jsarag/tiny-gpt2"
OWNED = ("output_dir", "data.dir", "train.seed", "estimator", "retriever.model", "retriever.passage_model",
         "posterior.model", "generator.model")  # keys the bench sets per run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``jsarag bench estimators`` to its parser."""
    parser.add_argument("--config", type=Path, default=Path("planted"),
                        help="recipe shared by every run (its estimator, models, data and seed are set per run)")
    parser.add_argument("--estimators", default=DEFAULT_ESTIMATORS,
                        help="comma-separated; LABEL:NAME runs one twice, LABEL.key=value sets its options")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (training and encoder noise)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_estimators"), help="folder of data, models, runs")
    parser.add_argument("--people", type=int, default=96, help="passages in the KB (one per invented person)")
    parser.add_argument("--dev-share", type=float, default=0.25, help="share of the people asked about in dev")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the planted facts")
    parser.add_argument("--prior-noise", type=float, default=1.0, help="noise of the prior's query encoder")
    parser.add_argument("--posterior-noise", type=float, default=0.3, help="noise of the posterior's query encoder")
    parser.add_argument("--reader-steps", type=int, default=2000,
                        help="at most this many steps teaching the generator to read (0: none)")
    parser.add_argument("--treatment", default="jsa",
                        help="label compared with the best other estimator (paired bootstrap interval per metric)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamplings of the dev questions")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides for every run, e.g. train.max_steps=200")


def main(args: argparse.Namespace) -> int:
    """Write the task and the start models, train or reuse every run, then write and print the results."""
    check_arguments(args)
    started = time.perf_counter()
    out = args.out
    data = write_planted(out / "data", args.people, args.dev_share, args.data_seed)
    reader = prepare_reader(out / "models" / "reader", args.reader_steps, args.config, data)
    jobs, settings = plan(args, data, reader)
    for position, (job, _) in enumerate(jobs, 1):
        quality.run_job(job, f"[{position}/{len(jobs)}]", args.config, 0)
    report = build_report(jobs, settings, time.perf_counter() - started)
    report["significance"] = quality.significance([job for job, _ in jobs], args.treatment, args.resamples)
    markdown = render_markdown(report)
    quality.write_text(out / "estimators.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    quality.write_text(out / "estimators.md", markdown + "\n")
    draw_curves(out / "estimators.png", report)
    print(f"\n{markdown}\n\nwritten: {out / 'estimators.json'}, {out / 'estimators.md'}, {out / 'estimators.png'}")
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse impossible sizes and noise levels, naming the option."""
    if args.people < 8:
        raise RecipeError(f"--people {args.people}: give at least 8")
    if not 0 < args.dev_share < 1:
        raise RecipeError(f"--dev-share {args.dev_share}: give a share between 0 and 1")
    for option, value in (("--prior-noise", args.prior_noise), ("--posterior-noise", args.posterior_noise),
                          ("--reader-steps", args.reader_steps)):
        if value < 0:
            raise RecipeError(f"{option} {value}: give a value of 0 or more")


# -- the start models -----------------------------------------------------------------------------------------------

def noisy_encoder(folder: Path, noise: float, seed: int) -> Path:
    """Build (once) a copy of the tiny BERT bi-encoder whose weights and biases (not its LayerNorms) carry Gaussian
    noise of ``noise`` times each tensor's standard deviation, drawn with ``seed``. Commands sharing ``--out`` build
    it once (the second waits on a file lock), and a failed build leaves no half-written folder under this name (a
    SIGKILLed one may leave a hidden temporary folder beside it, which nothing reads)."""
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if (folder / "modules.json").is_file():
            return folder
        import torch
        from transformers import BertModel

        from jsarag.files import atomic_folder
        from jsarag.models import resolve_model

        with atomic_folder(folder) as tmp:
            shutil.copytree(resolve_model(PASSAGE_ENCODER), tmp, dirs_exist_ok=True)
            bert = BertModel.from_pretrained(tmp)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, param in bert.named_parameters():
                    if "LayerNorm" not in name:
                        param.add_(torch.randn(param.shape, generator=generator) * param.std() * noise)
            bert.save_pretrained(tmp)
    return folder


def prepare_reader(folder: Path, steps: int, config: Path, data: Path) -> str:
    """Teach the tiny GPT-2 to read (once): AdamW steps of 8 supervised copies each, on facts about invented people
    who are not in the KB, in the recipe's prompt, until it reads 95% of held-out facts or for ``steps`` steps;
    return the model folder (the plain tiny GPT-2 for 0). Commands sharing ``--out`` teach it once."""
    if steps == 0:
        return READER_BASE
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if (folder / "reader.json").is_file():
            return str(folder)
        from jsarag.recipe import load_recipe

        template = load_recipe(config).generator.options.prompt
        taken = {json.loads(line)["text"].split(" is the home of ")[1][:-2] for line in open(data / "passages.jsonl")}
        print(f"teaching the generator to read (at most {steps} steps) into {folder} ... ", end="", flush=True)
        started = time.perf_counter()
        done, accuracy = train_reader(folder, steps, template, taken)
        print(f"{done} steps, {time.perf_counter() - started:.0f} s, accuracy on 200 new people {100 * accuracy:.0f}%",
              flush=True)
    return str(folder)


def train_reader(folder: Path, steps: int, template: str, taken: set[str], batch: int = 8, target: float = 0.95
                 ) -> tuple[int, float]:
    """Train and save the reader; return the steps taken and its greedy accuracy on 200 held-out facts."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jsarag.models import resolve_model

    source = resolve_model(READER_BASE)
    tokenizer, model = AutoTokenizer.from_pretrained(source), AutoModelForCausalLM.from_pretrained(source)
    prefix, suffix = template.split("{passage}")
    rng, eos = random.Random(1234), tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def fact() -> tuple[list[int], list[int]]:  # the generator's prompt layout: prefix, passage, suffix
        name = next(n for n in iter(lambda: invented_names(1, rng)[0], None) if n not in taken)
        city = rng.choice(CITIES)
        question = rng.choice(QUESTIONS).format(name=name)
        prompt = ids(prefix) + ids(PASSAGE.format(city=city, name=name)) + ids(suffix.format(history="",
                                                                                          question=question))
        return prompt, ids(" " + city) + [eos]

    held_out = [fact() for _ in range(200)]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    model.eval()  # no dropout, as the generator scores

    def accuracy() -> float:
        with torch.no_grad():
            return sum(int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax() == a[0])
                       for p, a in held_out) / len(held_out)

    done, reads = 0, 0.0
    while done < steps and reads < target:
        for _ in range(min(100, steps - done)):
            loss = sum(_answer_nll(model, *fact()) for _ in range(batch)) / batch
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            done += 1
        reads = accuracy()
    from jsarag.files import atomic_folder

    shutil.rmtree(folder, ignore_errors=True)  # a reader folder without reader.json: not this command's
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "reader.json").write_text(json.dumps({"steps": done, "max_steps": steps, "accuracy": reads}) + "\n")
    return done, reads


def _answer_nll(model, prompt: list[int], answer: list[int]):
    """() the summed negative log-likelihood of ``answer`` after ``prompt``."""
    import torch

    logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum")


# -- planning -------------------------------------------------------------------------------------------------------

def plan(args: argparse.Namespace, data: Path, reader: str) -> tuple[list[tuple[quality.Job, str]], dict[str, Any]]:
    """Plan every (estimator, seed) run with its overrides and validated recipe; return them and the settings."""
    from jsarag.plugins import Plugins
    from jsarag.recipe import load_recipe
    from jsarag.tools.diagnose import parse_estimators, split_overrides

    plugins = Plugins()
    pairs = parse_estimators(args.estimators)
    recipe_overrides, given = split_overrides(args.overrides, [label for label, _ in pairs])
    _check_owned(recipe_overrides)
    base = load_recipe(args.config, recipe_overrides, plugins)
    estimators = {}
    for label, name in pairs:
        _plain_label(label)
        options = {**DEFAULT_OPTIONS.get(label, {}), **given[label]}
        estimators[label] = (name, quality.estimator_values(name, label, options, base, plugins))
    seeds = quality.parse_seeds(args.seeds)
    dataset = quality.Dataset("planted", data, "dev")
    out = args.out.absolute()
    jobs = []
    for label, (name, values) in estimators.items():
        needs_all = plugins.component("estimator", name).cls.needs_all_candidates
        for seed in seeds:
            folder = out / label / f"seed{seed}"
            models = start_models(out / "models", seed, args.prior_noise, args.posterior_noise, reader)
            overrides = [*recipe_overrides, *quality.run_overrides(folder, dataset, seed, name, values), *models,
                         *(["candidates.mode=all"] if needs_all else [])]
            overrides = [o for o in overrides if not o.startswith("data.eval_splits=")]
            job = quality.Job(dataset, label, seed, folder, overrides, load_recipe(args.config, overrides, plugins))
            jobs.append((job, name))
    settings = {"config": str(args.config), "overrides": recipe_overrides, "seeds": seeds,
                "estimators": {label: {"name": n, "options": o} for label, (n, o) in estimators.items()},
                "task": {"people": args.people, "dev_share": args.dev_share, "data_seed": args.data_seed,
                         "train_examples": _lines(data / "train.jsonl"), "dev_examples": _lines(data / "dev.jsonl")},
                "start": {"prior_noise": args.prior_noise, "posterior_noise": args.posterior_noise,
                          "reader_steps": args.reader_steps, "reader": _reader_record(reader)},
                "train": {"max_steps": base.train.max_steps, "batch_size": base.train.batch_size,
                          "eval_every": base.train.eval_every},
                "candidates": {"prior_top_k": base.candidates.prior_top_k,
                               "posterior_top_k": base.candidates.posterior_top_k}}
    return jobs, settings


def start_models(folder: Path, seed: int, prior_noise: float, posterior_noise: float, reader: str) -> list[str]:
    """The overrides that give a run of ``seed`` its start models (built once each)."""
    prior = noisy_encoder(folder / f"prior-noise{prior_noise:g}-seed{seed}", prior_noise, seed)
    posterior = noisy_encoder(folder / f"posterior-noise{posterior_noise:g}-seed{seed}", posterior_noise, 10_000 + seed)
    return [f"retriever.model={json.dumps(str(prior))}", f"retriever.passage_model={PASSAGE_ENCODER}",
            f"posterior.model={json.dumps(str(posterior))}", f"generator.model={json.dumps(reader)}"]


def _check_owned(overrides: list[str]) -> None:
    """Refuse an override of a key the bench sets per run."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if any(key == owned or key.startswith(owned + ".") for owned in OWNED):
            raise RecipeError(f"override '{item}': the bench sets {key} per run (--estimators, --seeds, --out and "
                              "the noise and reader options choose it)")


def _plain_label(label: str) -> None:
    """Refuse an estimator label that cannot be a folder name."""
    from jsarag.paths import plain_name

    try:
        plain_name(label)
    except RecipeError:
        raise RecipeError(f"--estimators: '{label}' names a folder of --out; use letters, digits, _ . -") from None


def _lines(path: Path) -> int:
    return sum(1 for line in path.open() if line.strip())


def _reader_record(reader: str) -> dict[str, Any] | None:
    path = Path(reader) / "reader.json"
    return json.loads(path.read_text()) if path.is_file() else None


# -- the report -----------------------------------------------------------------------------------------------------

def curves(folder: Path) -> dict[int, dict[str, float]]:
    """A finished run's dev metrics by evaluated step (metrics.json's history)."""
    history = json.loads((folder / "metrics.json").read_text())["history"]
    return {entry["step"]: entry["dev"] for entry in history if "dev" in entry}


def band(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min and max of values over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def build_report(jobs: list[tuple[quality.Job, str]], settings: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The content of estimators.json: every run's curves, and per estimator the spread over seeds."""
    runs, labels = [], list(dict.fromkeys(job.label for job, _ in jobs))
    for job, name in jobs:
        runs.append({"estimator": job.label, "name": name, "seed": job.seed, "output_dir": str(job.output_dir),
                     "wall_s": job.wall_s, "reused": job.reused, "curves": curves(job.output_dir)})
    aggregates = {}
    for label in labels:
        mine = [r for r in runs if r["estimator"] == label]
        steps = sorted(set.intersection(*(set(r["curves"]) for r in mine)))
        aggregates[label] = {
            "curves": {metric: {str(step): band([r["curves"][step][metric] for r in mine]) for step in steps}
                       for metric in CURVES},
            "final": {metric: band([r["curves"][steps[-1]][metric] for r in mine]) for metric in TABLE_METRICS},
            "curve_mean": {metric: band([statistics.fmean(r["curves"][s][metric] for s in steps) for r in mine])
                           for metric in CURVES},
            "wall_s": band([r["wall_s"] for r in mine if r["wall_s"] is not None]) if any(
                r["wall_s"] is not None for r in mine) else None,
        }
    return {"machine": quality.machine(), "command": shlex.join(["jsarag", *sys.argv[1:]]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "bench_wall_s": wall_s, "settings": settings, "runs": runs, "aggregates": aggregates}


def render_markdown(report: dict[str, Any]) -> str:
    """estimators.md: the settings in a paragraph, then the final and curve-mean table (mean ± std in %)."""
    s, m = report["settings"], report["machine"]
    t, c, start = s["task"], s["candidates"], s["start"]
    reader = start["reader"]
    lines = [
        "# Planted retrieval: which estimator learns", "",
        f"{report['date']} on {m['platform']}, {m['cpus']} CPUs; command `{report['command']}` "
        f"({report['bench_wall_s']:.0f} s in all).", "",
        f"{t['people']} passages (one per invented person), {t['train_examples']} train and {t['dev_examples']} dev "
        f"questions (dev asks about other people); {s['train']['max_steps']} steps of {s['train']['batch_size']}; "
        f"k_p = {c['prior_top_k']}, k_q = {c['posterior_top_k']}; prior noise {start['prior_noise']:g}, posterior "
        + f"noise {start['posterior_noise']:g}; "
        + (f"reader taught for {reader['steps']} steps ({100 * reader['accuracy']:.0f}% on new people)" if reader
           else "untaught generator")
        + f"; seeds {', '.join(map(str, s['seeds']))}. Dev metrics in %, mean ± sample std over seeds [min–max]; "
        "'curve mean' averages a run's evaluations over training (higher: learned sooner).", "",
        "| estimator | Recall@1 final | Recall@10 final | accuracy final | Recall@1 curve mean | accuracy curve mean "
        "| wall s / run |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, a in report["aggregates"].items():
        cells = [_cell(a["final"][k]) for k in TABLE_METRICS] + [_cell(a["curve_mean"][k]) for k in CURVES]
        wall = f"{a['wall_s']['mean']:.0f}" if a["wall_s"] else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {wall} |")
    gains = report.get("significance", {}).get("planted")
    if gains:
        lines += ["", "At the last step: " + quality.gains_table(gains)]
    lines += ["", "![curves](estimators.png)"]
    return "\n".join(lines)


def _cell(value: dict[str, Any]) -> str:
    text = f"{100 * value['mean']:.1f}"
    if value["std"] is None:
        return text
    return f"{text} ± {100 * value['std']:.1f} [{100 * value['min']:.0f}–{100 * value['max']:.0f}]"


def draw_curves(path: Path, report: dict[str, Any]) -> Path:
    """estimators.png: per curve metric, each estimator's mean over seeds by step, ± one std as a band."""
    from jsarag.tools.plots import curve_bands

    panels = {title: {label: {int(step): (v["mean"], v["std"] or 0.0) for step, v in a["curves"][metric].items()}
                      for label, a in report["aggregates"].items()}
              for metric, title in CURVES.items()}
    return curve_bands(path, panels, xlabel="training step")
