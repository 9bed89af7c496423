"""``jsarag export RUN_DIR OUT``: a run's trained models as folders their own libraries load, without jsarag.

From any complete checkpoint (the latest, or ``--checkpoint step-N``), whatever ZeRO stage and number of ranks
trained it, in one process: the run is rebuilt from the recipe it recorded (``run.json``, ``recipe.yaml``), the
checkpoint's weights are loaded into it (ZeRO-3 consolidated by DeepSpeed's zero_to_fp32), and each component writes
its models through ``Component.export``. OUT receives::

    generator/        the generator: a Hugging Face folder (LoRA merged, or with --adapter the PEFT adapter alone)
    prior/            the prior's query encoder, a sentence-transformers folder (passage_encoder/ inside it)
    posterior/        the posterior's, when the estimator trained one
    index/<key>/      the passage vectors and index the prior searched (cache key: KB, passage encoder, index)
    kb/passages.jsonl the knowledge base (same fingerprint)
    recipe.yaml       the run's recipe, every default filled, pointing at these folders: `jsarag ask OUT` uses it
    export.json       what was exported from where; README.md the model card

OUT is written into a hidden sibling folder and renamed into place when complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from jsarag.api import Component, atomic_write, metrics_table
from jsarag.checkpoint import find
from jsarag.errors import RecipeError
from jsarag.loop import load_weights
from jsarag.recipe import Recipe, load_recipe
from jsarag.run import Run, build_run
from jsarag.tools.config import recipe_data

RUN_INFO, EXPORT_INFO, RECIPE = "run.json", "export.json", "recipe.yaml"
ONE_PROCESS = ["observers=[]", "deepspeed.config=zero0.json", "deepspeed.overrides={}"]  # plain modules, no engine
ROLES = ("prior", "posterior", "generator")


@dataclass
class Opened:
    """A run rebuilt from a run folder or an export, with its trained weights."""

    run: Run
    folder: Path  # the run folder or the export
    exported: bool  # an export (its models are in its folders) rather than a run folder
    step: int  # the step of the weights (0: the models as built)
    checkpoint: Path | None  # the checkpoint they came from (a run folder's)

    def describe(self) -> str:
        """Where the weights came from, in a line."""
        if self.exported:
            info = json.loads((self.folder / EXPORT_INFO).read_text())
            return f"the models exported to {self.folder} from {info['checkpoint']} (step {info['step']})"
        if self.checkpoint is None:
            return f"the models as built: no checkpoint in {self.folder / 'checkpoints'}"
        return f"the trained models of step {self.step} ({self.checkpoint})"


def open_folder(folder: Path, tag: str | None = None, config: Path | None = None, overrides: list[str] = (),
                generator: bool = True, keep_eval_splits: bool = False) -> Opened:
    """Rebuild the run of a run folder (from its recorded recipe, or ``config``) with a checkpoint's weights, or of an
    export, in this process with no engine; relative paths of the recipe are taken from where it ran."""
    folder = folder.resolve()
    exported = (folder / EXPORT_INFO).is_file()
    if exported and tag is not None:
        raise RecipeError(f"--checkpoint {tag}: {folder} is an export, which holds one set of models")
    recipe_file, base = _recipe_source(folder, exported, config)
    if not exported:
        find(folder / "checkpoints", tag)  # a wrong --checkpoint fails before any model loads
    fixed = [*ONE_PROCESS, f"output_dir={folder}", *([] if keep_eval_splits else ["data.eval_splits=[]"])]
    with working_dir(base):
        recipe = load_recipe(recipe_file, [*fixed, *overrides])
        run = build_run(recipe, train=False, engine=False, generator=generator)
        if run.ctx.world_size > 1:
            raise RecipeError("export and ask run in one process: start them without the deepspeed launcher")
        if exported:
            _check_kb(run, folder)
            return Opened(run, folder, True, json.loads((folder / EXPORT_INFO).read_text())["step"], None)
        step, checkpoint = load_weights(run, tag)
    return Opened(run, folder, False, step, checkpoint)


def _recipe_source(folder: Path, exported: bool, config: Path | None) -> tuple[Path, Path]:
    """The recipe file to rebuild the run from and the folder its relative paths are relative to."""
    if config is not None:
        return config.resolve() if config.exists() else config, Path.cwd()
    if exported:
        return folder / RECIPE, folder
    if not (folder / RUN_INFO).is_file() or not (folder / RECIPE).is_file():
        raise RecipeError(f"{folder}: no {RUN_INFO} and {RECIPE} (a run folder records them when it trains; an "
                          f"export has {EXPORT_INFO}); for a run trained before they were recorded, pass --config "
                          "with the recipe and overrides it was trained with")
    cwd = Path(json.loads((folder / RUN_INFO).read_text())["cwd"])
    return folder / RECIPE, cwd if cwd.is_dir() else Path.cwd()


@contextlib.contextmanager
def working_dir(folder: Path) -> Iterator[None]:
    """Run a block in ``folder`` (a recipe's relative paths are relative to where it ran)."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _check_kb(run: Run, folder: Path) -> None:
    """Refuse an export whose KB is not the one its index was built over."""
    recorded = json.loads((folder / EXPORT_INFO).read_text())["kb"]["fingerprint"]
    if run.ctx.kb.fingerprint != recorded:
        raise RecipeError(f"{folder}/kb: its passages' fingerprint {run.ctx.kb.fingerprint} is not the exported "
                          f"KB's {recorded} (export.json); the folder was changed after the export")


# -- jsarag export --------------------------------------------------------------------------------------------------

def export(run_dir: Path, out: Path, tag: str | None = None, adapter: bool = False, config: Path | None = None,
           overrides: list[str] = ()) -> Path:
    """Export a run folder's models (from checkpoint ``tag``, default the latest) into the new folder ``out``."""
    out = out.resolve()
    if out.exists():
        raise RecipeError(f"{out} exists: export writes a new folder (delete it or choose another)")
    opened = open_folder(run_dir, tag, config, overrides, keep_eval_splits=True)
    if opened.exported:
        raise RecipeError(f"{opened.folder} is an export already; export a run folder")
    if opened.checkpoint is None:
        raise RecipeError(f"{opened.folder}: no complete checkpoint to export in {opened.folder / 'checkpoints'}")
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with working_dir(_base(opened)):
            contents = _write_export(opened, tmp, adapter, out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for line in contents:
        print(line)
    print(f"exported step {opened.step} of {opened.folder} to {out}")
    return out


def _base(opened: Opened) -> Path:
    info = opened.folder / RUN_INFO
    cwd = Path(json.loads(info.read_text())["cwd"]) if info.is_file() else Path.cwd()
    return cwd if cwd.is_dir() else Path.cwd()


def _write_export(opened: Opened, tmp: Path, adapter: bool, out_name: str) -> list[str]:
    """Write every part of an export into ``tmp``; return a line per part."""
    run = opened.run
    sections, lines = {}, []
    for role in ROLES:
        component: Component | None = getattr(run, role)
        if component is None or role == "posterior" and component is run.prior:
            continue
        options = component.export(tmp / role, adapter=adapter)
        if options is not None:
            sections[role] = _relative(options, tmp)
            lines.append(f"{role + '/':<18} {run.registered(component).describe()}")
    indexes = _copy_indexes(run, tmp / "index")
    lines += [f"index/{key}/   the passage index ({meta['passages']} passages, {meta['index']})"
              for key, meta in indexes.items()]
    _write_kb(run, tmp / "kb" / "passages.jsonl")
    lines.append(f"{'kb/passages.jsonl':<18} {len(run.ctx.kb)} passages, fingerprint {run.ctx.kb.fingerprint}")
    recipe = exported_recipe(run.recipe, sections)
    atomic_write(tmp / RECIPE, yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    info = export_info(opened, adapter, sections, indexes)
    atomic_write(tmp / EXPORT_INFO, json.dumps(info, indent=2))
    atomic_write(tmp / "README.md", model_card(opened, info, out_name))
    return [*lines, f"{'recipe.yaml':<18} loads these folders back (jsarag ask)", f"{'README.md':<18} the model card"]


def _relative(options: Any, root: Path) -> Any:
    """Options with every path inside ``root`` made relative to it (an export is read from its own folder)."""
    if isinstance(options, dict):
        return {key: _relative(value, root) for key, value in options.items()}
    if isinstance(options, list):
        return [_relative(value, root) for value in options]
    if isinstance(options, (str, Path)) and Path(options).is_absolute() and Path(options).is_relative_to(root):
        return Path(options).relative_to(root).as_posix() or "."
    return options


def _copy_indexes(run: Run, folder: Path) -> dict[str, dict[str, Any]]:
    """Copy the cached passage indexes the retrievers searched into ``folder``/<key> (live re-embeddings of a trained
    passage encoder are left out: the exported encoder embeds the KB again); return their meta by key."""
    copied = {}
    for retriever in (run.prior, run.posterior):
        built = retriever.passage_index() if retriever is not None else None
        if built is None or built.folder.name in copied:
            continue
        meta = built.meta
        if "step" in meta:
            continue  # a live build (index-live/<role>: the step whose encoder embedded it), keyed by role
        shutil.copytree(built.folder, folder / built.folder.name)
        copied[built.folder.name] = meta
    return copied


def _write_kb(run: Run, path: Path) -> None:
    """Write the knowledge base as passages.jsonl, row by row (ids, titles and texts as loaded: the same
    fingerprint)."""
    path.parent.mkdir(parents=True)
    with path.open("w", encoding="utf-8") as f:
        for row in range(len(run.ctx.kb)):
            p = run.ctx.kb.passage(row)
            f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False) + "\n")


def exported_recipe(recipe: Recipe, sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's recipe, every default filled, with the exported folders, the exported KB and index."""
    data = recipe_data(recipe)
    for role, options in sections.items():
        section = "retriever" if role == "prior" else role
        data[section] = {**data[section], **options}
    if data["posterior"] != "prior" and "posterior" not in sections:
        data["posterior"] = "copy"  # none was trained: the retriever section, should an estimator need one
    kept = ("train_split", "drop_unanswerable", "max_history_turns", "on_error")
    data["data"] = {"dir": "kb", "eval_splits": [], **{key: data["data"][key] for key in kept}}
    data["index"]["dir"] = "index"  # under output_dir, which `jsarag ask` sets to the export folder
    data["output_dir"] = "runs/from-export"  # where training from this recipe would write (ask ignores it)
    return data


def export_info(opened: Opened, adapter: bool, sections: dict[str, Any], indexes: dict[str, Any]) -> dict[str, Any]:
    """What export.json records: the source run and checkpoint, the parts, the KB."""
    kb = opened.run.ctx.kb
    return {"run": str(opened.folder), "checkpoint": str(opened.checkpoint), "step": opened.step,
            "max_steps": opened.run.recipe.train.max_steps, "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "adapter": adapter, "parts": sorted(sections), "indexes": indexes,
            "kb": {"source": str(kb.path), "passages": len(kb), "fingerprint": kb.fingerprint}}


# -- the model card -------------------------------------------------------------------------------------------------

def model_card(opened: Opened, info: dict[str, Any], out_name: str) -> str:
    """README.md of an export: what it is, how to load each part, how it was trained, on what, and how it scored."""
    run, trained = opened.run, recipe_data(opened.run.recipe)
    base = trained["generator"].get("model", run.recipe.generator.name)
    how = "the PEFT adapter alone" if info["adapter"] else \
        "LoRA merged into the base" if trained["generator"].get("lora") else "all weights fine-tuned"
    metrics_file = opened.folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {"history": []}
    run_info = json.loads((opened.folder / RUN_INFO).read_text()) if (opened.folder / RUN_INFO).is_file() else {}
    invocations = run_info.get("invocations", [])
    commands = [i["command"] for i in invocations] or ["(not recorded: the run predates run.json)"]
    ranks = invocations[-1]["world_size"] if invocations else "?"
    estimator = run.recipe.estimator.name
    lines = ["---", "library_name: transformers", f"base_model: {json.dumps(str(base))}",
             f"tags: [jsarag, retrieval-augmented-generation, {estimator}]", "---", "",
             f"# {out_name}: a jsarag {estimator} run, exported", "",
             f"Step {info['step']} of {info['max_steps']} of the run in `{opened.folder}` (checkpoint "
             f"`{info['checkpoint']}`), exported {info['exported']}. Estimator **{estimator}**, prior "
             f"**{run.recipe.retriever.name}**, generator **{run.recipe.generator.name}** (`{base}`, {how}).", "",
             "## Contents", "", "| folder | what | load with |", "|---|---|---|", *content_rows(info, how), "",
             "## Use", "", "```bash", f"jsarag ask {out_name} -q \"your question\"   # the prior's ranked passages "
             "and the generator's answer", f"jsarag ask {out_name} --questions questions.jsonl --out answers.jsonl",
             "```", "", "```python", "from sentence_transformers import SentenceTransformer",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             "prior = SentenceTransformer(\"prior\")  # query vectors: prior.encode(questions, normalize_embeddings=True)",
             "generator = AutoModelForCausalLM.from_pretrained(\"generator\")",
             "tokenizer = AutoTokenizer.from_pretrained(\"generator\")", "```", "",
             "## Training", "", f"Trained from `{run_info.get('cwd', '?')}` on {ranks} rank(s) with:", "", "```bash",
             *commands, "```", "", "## Data", "", *data_lines(run), "", "## Metrics", "",
             "Every evaluation of the run (its metrics.json), in %:", "", metrics_table(metrics), "",
             "## Recipe", "", "The recipe as trained, every default filled:", "", "```yaml",
             yaml.safe_dump(trained, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    return "\n".join(lines)


def content_rows(info: dict[str, Any], how: str) -> list[str]:
    """The model card's table of the export's folders."""
    rows = []
    if "generator" in info["parts"]:
        loader = "`PeftModel.from_pretrained(base_model, \"generator\")`" if info["adapter"] else \
            "`AutoModelForCausalLM.from_pretrained(\"generator\")`"
        rows.append(f"| `generator/` | p(y\\|x,h), with its tokenizer ({how}) | {loader} |")
    for role, what in (("prior", "p(h\\|x)"), ("posterior", "q(h\\|x,y), reading x [SEP] y")):
        if role in info["parts"]:
            rows.append(f"| `{role}/` | {what}: the query encoder; `{role}/passage_encoder/` the passage encoder | "
                        f"`SentenceTransformer(\"{role}\")` |")
    for key, meta in info["indexes"].items():
        rows.append(f"| `index/{key}/` | {meta['passages']} passage vectors (`vectors.npy`, {meta['dim']} dims) and "
                    f"the `{meta['index']}` index over them | `numpy.load`, FAISS |")
    kb = info["kb"]
    rows += [f"| `kb/passages.jsonl` | the knowledge base: {kb['passages']} passages (fingerprint "
             f"`{kb['fingerprint']}`, from `{kb['source']}`) | JSON lines |",
             "| `recipe.yaml` | the run's recipe, every default filled, pointing at these folders | `jsarag ask` |"]
    return rows


def data_lines(run: Run) -> list[str]:
    """Markdown bullets naming the KB and every split the run read."""
    data = run.recipe.data
    lines = [f"- knowledge base: `{run.ctx.kb.path}`, {len(run.ctx.kb)} passages"]
    for split in [data.train_split, *data.eval_splits]:
        where = "trained on" if split == data.train_split else "evaluated on"
        lines.append(f"- {split} ({where}): `{_source(data.split_source(split))}`")
    return lines


def _source(source: Any) -> str:
    return str(getattr(source, "path", source))
