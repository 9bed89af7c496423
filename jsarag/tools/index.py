"""``jsarag index build|info|search``: build (or load) the recipe's passage index, describe it, or rank passages
for one query with the recipe's prior retriever."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from jsarag.api import Batch, Example, PassageIndex, shorten
from jsarag.loop import load_weights
from jsarag.passages import cached_folders, describe, index_dir
from jsarag.recipe import load_recipe
from jsarag.run import Run, build_run


def index_command(action: str, config: Path, overrides: list[str], query: str | None = None, k: int = 5) -> int:
    """Build the run's retrievers (no generator, no engine), then build, describe or search."""
    run = build_run(load_recipe(config, overrides), train=False, generator=False)
    if run.ctx.rank != 0 and action != "search":
        return 0
    built = run.prior.passage_index()
    if action == "build":
        _print_build(run, built)
    elif action == "info":
        _print_info(run, built.folder if built is not None else None)
    else:
        _print_search(run, query, k)
    return 0


def _print_build(run: Run, built: PassageIndex | None) -> None:
    """Say where the index is and what its build cost (embedding shards reused from a killed build included)."""
    where = built.folder if built is not None else "(this retriever keeps no passage index)"
    print(f"index ready in {where} for {len(run.ctx.kb)} passages of {run.ctx.kb.path}")
    meta = built.meta if built is not None else {}
    if "shards" in meta:
        print(f"built {meta['built']} on {meta['world_size']} rank(s): {meta['vectors']} vectors embedded in "
              f"{meta['embed_seconds']} s ({meta['shards_reused']} of {meta['shards']} shards reused from an "
              f"interrupted build), index built in {meta['build_seconds']} s")


def _print_info(run: Run, folder: Path | None) -> None:
    """Print the fingerprint and sizes of the index in use, then the other builds in its cache folder."""
    cache = index_dir(run.recipe.index.options.dir, run.ctx)
    if folder is None:
        print(f"the retriever built no index folder (cache: {cache})")
        return
    info = describe(folder)
    for key in ("folder", "key", "kb", "encoder", "index", "passages", "dim", "step", "built", "embed_seconds",
                "build_seconds"):
        if key in info:
            print(f"{key:<14} {info[key]}")
    for name, size in info["files"].items():
        print(f"{'file':<14} {name}  {size / 2**20:.1f} MiB")
    print(f"{'total':<14} {info['bytes'] / 2**20:.1f} MiB")
    others = [f for f in cached_folders(cache) if f.resolve() != Path(folder).resolve()]
    if others:
        print(f"other builds in {cache}:")
        for other in others:
            o = describe(other)
            print(f"  {o['key']}  {o.get('index')}  {o.get('passages')} passages  {o['bytes'] / 2**20:.1f} MiB")


def _print_search(run: Run, query: str, k: int) -> None:
    """Retrieve for one query (as a question without dialog history) with the retrievers of the run's latest
    checkpoint, and print the ranked passages (rank 0)."""
    step, folder = load_weights(run)
    if run.ctx.rank == 0:
        print(f"retriever: the trained query encoder of step {step} ({folder})" if folder else
              f"retriever: as built (no checkpoint in {run.recipe.output_dir / 'checkpoints'})")
    example = Example(id="query", context=(), question=query, answer="", answers=(), gold_passage_ids=())
    started = time.perf_counter()
    with torch.no_grad():
        candidates = run.rank(Batch([example], [0]), min(k, len(run.ctx.kb)))
    took = time.perf_counter() - started
    if run.ctx.rank != 0:
        return
    print(f"query: {shorten(' '.join(query.split()), 200)}  ({took * 1000:.0f} ms)")
    kb = run.ctx.kb
    for rank, (row, logit) in enumerate(zip(candidates.rows[0].tolist(), candidates.prior_logits[0].tolist()), start=1):
        if row >= 0:
            passage = kb.passage(row)
            text = shorten(" ".join(kb.render(row).split()), 160)
            print(f"{rank:>3}. row {row:<7} logit {logit:8.3f}  [{passage.id}] {text}")
