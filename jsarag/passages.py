"""Passage embeddings and their index, built once per (knowledge base, passage encoder, index options) and cached.

The cache folder is keyed by a fingerprint of all three, so a changed KB or encoder gets a fresh build; a folder
whose recorded fingerprint disagrees with what the run expects is an error, never a silent wrong answer.
Every rank embeds its share of the KB into one memory-mapped ``vectors.npy`` (so a KB larger than RAM can be
embedded and indexed); rank 0 then builds the index, atomically (a temporary folder renamed into place), and all
ranks load it. The same machinery re-embeds the KB when a trained passage encoder asks for a refresh.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import torch
from pydantic import field_validator
from tqdm.auto import tqdm

from jsarag.components import Component, Options, PathOption, RunContext
from jsarag.errors import IndexMismatchError
from jsarag.paths import confined, stays_inside

log = logging.getLogger("jsarag.passages")
Encode = Callable[[list[str]], np.ndarray]  # texts -> (n, d) vectors


class Index(Protocol):
    """What a retriever needs of an index component.

    ``build`` gets the (P, d) vectors (usually a read-only memmap: read it in chunks), ``search`` takes (B, d) queries
    and returns (scores, rows), each (B, k), best first. An index sharded across ranks (``torch_exact``) makes
    ``search`` a collective: every rank must call it the same number of times. ``folder`` is where builds are cached;
    ``build_or_load`` sets ``loaded_from`` to the folder in use. ``ntotal`` (passages indexed) is optional.
    """

    folder: Path

    def fingerprint_options(self) -> str: ...
    def build(self, vectors: np.ndarray) -> None: ...
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...


# -- what the built-in indexes share --------------------------------------------------------------------------------

class IndexOptions(Options):
    """Options every built-in index accepts."""

    dir: Literal["kb"] | PathOption | None = None
    """Where builds are cached: null = <cache>/indexes; ``kb`` = a .jsarag-indexes folder beside the passages file
    (falls back to the cache when that folder is not writable); an absolute path; or a relative path, taken under
    output_dir (it may not climb out with '..')."""
    refresh: str | None = None
    """Re-embedding schedule for a trained passage encoder, Atlas-style: ``"0-1000:500,1000-:1000"`` re-embeds every
    500 steps before step 1000, then every 1000 (null = never)."""

    @field_validator("dir")
    @classmethod
    def _dir_stays_inside(cls, value: str | Path | None) -> str | Path | None:
        return stays_inside(value) if isinstance(value, Path) else value

    @field_validator("refresh")
    @classmethod
    def _check_refresh(cls, value: str | None) -> str | None:
        if value is not None:
            parse_refresh(value)
        return value


class IndexComponent(Component):
    """Base of the built-in indexes: the cache folder and the refresh schedule."""

    kind = "index"
    Options = IndexOptions
    loaded_from: Path | None = None

    @property
    def folder(self) -> Path:
        """The folder built indexes are cached in."""
        return index_dir(self.options.dir, self.ctx)

    @property
    def refresh_schedule(self) -> list[tuple[int, int | None, int]]:
        """The parsed ``refresh`` option: (start, end or None, every) ranges; empty = never."""
        return parse_refresh(self.options.refresh) if self.options.refresh else []


def index_dir(option: str | Path | None, ctx: RunContext) -> Path:
    """Resolve an index's ``dir`` option (null, ``kb``, an absolute path or one relative to output_dir) to a folder."""
    if option is None:
        return ctx.cache_dir / "indexes"
    if str(option) != "kb":
        return confined(option, ctx.output_dir, "index.dir")
    beside = Path(ctx.kb.path).resolve().parent / ".jsarag-indexes"
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    log.warning("%s is not writable: caching the index in %s instead", beside, ctx.cache_dir / "indexes")
    return ctx.cache_dir / "indexes"


_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d*)\s*:\s*(\d+)\s*$")


def parse_refresh(text: str) -> list[tuple[int, int | None, int]]:
    """Parse ``"0-1000:500,1000-:1000"`` into [(0, 1000, 500), (1000, None, 1000)]; ValueError names the bad part."""
    ranges = []
    for part in text.split(","):
        match = _RANGE.match(part)
        if not match or int(match[3]) == 0 or (match[2] and int(match[2]) <= int(match[1])):
            raise ValueError(f"refresh range '{part.strip()}' must look like START-END:EVERY or START-:EVERY "
                             "(END > START, EVERY > 0), e.g. \"0-1000:500,1000-:1000\"")
        ranges.append((int(match[1]), int(match[2]) if match[2] else None, int(match[3])))
    return ranges


def refresh_due(schedule: list[tuple[int, int | None, int]], step: int) -> bool:
    """Whether the schedule re-embeds the KB after optimizer step ``step`` (never at step 0: the initial build)."""
    return step > 0 and any(a <= step and (b is None or step < b) and step % every == 0 for a, b, every in schedule)


def last_refresh(schedule: list[tuple[int, int | None, int]], step: int) -> int:
    """The latest step <= ``step`` at which the schedule re-embedded the KB (0: the initial build)."""
    return next((s for s in range(step, 0, -1) if refresh_due(schedule, s)), 0)


# -- building and loading -------------------------------------------------------------------------------------------

def index_fingerprint(kb_fingerprint: str, encoder_fingerprint: str, index_options: str) -> str:
    """Return the cache key of an index: the KB content, the passage encoder and the index options."""
    parts = json.dumps([kb_fingerprint, encoder_fingerprint, index_options]).encode()
    return hashlib.sha256(parts).hexdigest()[:20]


def build_or_load(
    ctx: RunContext,
    index: Index,
    folder: Path,
    encoder_fingerprint: str,
    encode: Encode,
    batch_size: int,
) -> np.ndarray:
    """Return the (P, d) memory-mapped passage vectors with ``index`` ready to search, building them if needed."""
    expected = {"kb": ctx.kb.fingerprint, "encoder": encoder_fingerprint, "index": index.fingerprint_options()}
    target = Path(folder) / index_fingerprint(*expected.values())
    if broadcast(ctx, not (target / "meta.json").exists()):
        build_folder(ctx, index, target, expected, encode, batch_size)
    return load(index, target, expected, len(ctx.kb))


def build_folder(
    ctx: RunContext, index: Index, target: Path, meta: dict[str, Any], encode: Encode, batch_size: int,
    replace: bool = False,
) -> None:
    """Embed the KB with every rank and build ``index`` into ``target`` (rank 0), atomically; all ranks call this."""
    tmp = broadcast(ctx, _make_tmp(target) if ctx.rank == 0 else None)
    started = time.perf_counter()
    embed_all(ctx, encode, batch_size, tmp / "vectors.npy")
    if ctx.rank == 0:
        embedded = time.perf_counter()
        vectors = np.load(tmp / "vectors.npy", mmap_mode="r")
        index.build(vectors)
        index.save(tmp)
        timing = {"embed_seconds": round(embedded - started, 2),
                  "build_seconds": round(time.perf_counter() - embedded, 2)}
        info = {**meta, "passages": int(vectors.shape[0]), "dim": int(vectors.shape[1]), **timing,
                "built": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
        _move_into_place(tmp, target, replace)
    ctx.barrier()


def _make_tmp(target: Path) -> Path:
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _move_into_place(tmp: Path, target: Path, replace: bool) -> None:
    old = target.with_name(f".old-{target.name}-{os.getpid()}")
    if replace and target.exists():
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # open memmaps of the old files stay valid until closed


def load(index: Index, target: Path, expected: dict[str, str], n_passages: int) -> np.ndarray:
    """Load a built index folder after checking it was built for this KB, encoder and index."""
    meta = read_meta(target)
    for what, value in expected.items():
        if meta.get(what) != value:
            raise IndexMismatchError(
                f"{target}: index built for another {what} (recorded {meta.get(what)}, this run has {value}); "
                "delete the folder or point index.dir elsewhere to rebuild"
            )
    vectors = _read_vectors(target)
    if vectors.shape[0] != n_passages:
        raise IndexMismatchError(f"{target}: {vectors.shape[0]} vectors for a KB of {n_passages} passages")
    index.load(target)
    indexed = getattr(index, "ntotal", n_passages)
    if indexed != n_passages:
        raise IndexMismatchError(f"{target}: the index holds {indexed} passages, the KB {n_passages}")
    index.loaded_from = target
    log.info("loaded index %s (%d passages, dim %d)", target, vectors.shape[0], vectors.shape[1])
    return vectors


def read_meta(folder: Path) -> dict[str, Any]:
    """The ``meta.json`` of a built index folder; a missing or unreadable one is an IndexMismatchError."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexMismatchError(f"{folder}: no meta.json, not a built index folder") from None
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise IndexMismatchError(f"{folder}/meta.json is corrupt ({err}); delete the folder to rebuild the "
                                 "index") from None
    if not isinstance(meta, dict):
        raise IndexMismatchError(f"{folder}/meta.json is not a JSON object; delete the folder to rebuild the index")
    return meta


def _read_vectors(folder: Path) -> np.ndarray:
    """The memory-mapped (P, d) ``vectors.npy`` of a built index folder; a missing or corrupt one is an
    IndexMismatchError."""
    try:
        vectors = np.load(Path(folder) / "vectors.npy", mmap_mode="r")
    except FileNotFoundError:
        raise IndexMismatchError(f"{folder}: no vectors.npy (an incomplete build); delete the folder to rebuild "
                                 "the index") from None
    except (OSError, ValueError) as err:
        raise IndexMismatchError(f"{folder}/vectors.npy is corrupt ({err}); delete the folder to rebuild the "
                                 "index") from None
    if vectors.ndim != 2:
        raise IndexMismatchError(f"{folder}/vectors.npy holds a {vectors.ndim}-d array, not (passages, dim); delete "
                                 "the folder to rebuild the index")
    return vectors


# -- embedding ------------------------------------------------------------------------------------------------------

def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank's contiguous share of n rows (ceil(n / world) each, the last ranks may get fewer)."""
    share = -(-n // world)
    lo = min(n, rank * share)
    return lo, min(n, lo + share)


def embed_all(ctx: RunContext, encode: Encode, batch_size: int, path: Path) -> np.ndarray:
    """Embed every passage into a memory-mapped (P, d) float32 file, each rank its share; all ranks call this.

    Every rank makes the same number of ``encode`` calls of the same sizes (short shares are padded with
    repeated rows), so an encoder partitioned by ZeRO-3 may be used.
    """
    n = len(ctx.kb)
    lo, hi = shard_range(n, ctx.rank, ctx.world_size)
    share = -(-n // ctx.world_size)
    starts = range(0, share, batch_size)
    bar = tqdm(total=share, desc="embedding passages", unit="passage", disable=ctx.rank != 0, mininterval=2)
    vectors = None
    for start in starts:
        rows = [min(lo + start + i, n - 1) for i in range(min(batch_size, share - start))]
        block = np.asarray(encode([ctx.kb.render(r) for r in rows]), dtype=np.float32)  # (b, d)
        if vectors is None:
            vectors = _open_shared(ctx, path, (n, block.shape[1]))
        keep = max(0, min(len(rows), hi - lo - start))
        vectors[lo + start : lo + start + keep] = block[:keep]
        bar.update(len(rows))
    bar.close()
    vectors.flush()
    ctx.barrier()
    return vectors


def _open_shared(ctx: RunContext, path: Path, shape: tuple[int, int]) -> np.memmap:
    """Rank 0 creates the (P, d) file; every rank then opens it for writing its rows."""
    if ctx.rank == 0:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape).flush()
    ctx.barrier()
    return np.lib.format.open_memmap(path, mode="r+")


def broadcast(ctx: RunContext, value: Any) -> Any:
    """Return rank 0's ``value`` on every rank (a picklable object)."""
    if ctx.world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# -- candidate rows -------------------------------------------------------------------------------------------------

def gather_rows(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(*rows.shape, d) float32 vectors of KB rows (-1 gives zeros), reading only those rows of a memmap."""
    flat = rows.reshape(-1)
    unique, inverse = np.unique(np.maximum(flat, 0), return_inverse=True)
    block = np.asarray(vectors[unique], dtype=np.float32)  # (U, d): only these rows are read
    out = block[inverse].reshape(*rows.shape, block.shape[1])
    out[rows < 0] = 0.0
    return out


def pad_rows(rows: list[list[int]]) -> torch.Tensor:
    """(B, C) long tensor of per-example row lists, -1 padded (C >= 1)."""
    width = max([1, *map(len, rows)])
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)


def union_rows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(B, C) per-example union of two (B, k) row lists, first's order kept, deduplicated, -1 padded."""
    merged = [list(dict.fromkeys(r for r in a + b if r >= 0)) for a, b in zip(first.tolist(), second.tolist())]
    return pad_rows(merged)


# -- inspection (jsarag index info) ---------------------------------------------------------------------------------

def describe(folder: Path) -> dict[str, Any]:
    """The recorded fingerprint of a built index folder with its sizes on disk (bytes, by file)."""
    folder = Path(folder)
    meta = read_meta(folder)
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    return {"folder": str(folder), "key": folder.name, **meta, "files": files, "bytes": sum(files.values())}


def cached_folders(folder: Path) -> list[Path]:
    """Built index folders (with a meta.json) under a cache folder, newest first."""
    found = [p for p in Path(folder).glob("*/meta.json") if not p.parent.name.startswith(".")]
    return [p.parent for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


# -- the `jsarag index` command -------------------------------------------------------------------------------------

def index_command(action: str, config: Path, overrides: list[str], query: str | None = None, k: int = 5) -> int:
    """``jsarag index build|info|search``: build (or load) the recipe's index, describe it, or run one query."""
    from jsarag.recipe import load_recipe
    from jsarag.run import build_run

    if action == "search":
        overrides = [*overrides, f"eval.top_k={k}"]
    run = build_run(load_recipe(config, overrides), train=False, kinds=("estimator", "index", "retriever"))
    if run.ctx.rank != 0 and action != "search":
        return 0
    index = run.components["index"]
    folder = getattr(index, "loaded_from", None)
    if action == "build":
        print(f"index ready in {folder or index.folder} for {len(run.ctx.kb)} passages of {run.ctx.kb.path}")
    elif action == "info":
        _print_info(index, folder)
    else:
        _print_search(run, query)
    return 0


def _print_info(index: Any, folder: Path | None) -> None:
    """Print the fingerprint and sizes of the index in use, then the other builds in its cache folder."""
    if folder is None:
        print(f"the retriever built no index folder (cache: {index.folder})")
        return
    info = describe(folder)
    for key in ("folder", "key", "kb", "encoder", "index", "passages", "dim", "step", "built", "embed_seconds",
                "build_seconds"):
        if key in info:
            print(f"{key:<14} {info[key]}")
    for name, size in info["files"].items():
        print(f"{'file':<14} {name}  {size / 2**20:.1f} MiB")
    print(f"{'total':<14} {info['bytes'] / 2**20:.1f} MiB")
    others = [f for f in cached_folders(index.folder) if f.resolve() != Path(folder).resolve()]
    if others:
        print(f"other builds in {index.folder}:")
        for other in others:
            o = describe(other)
            print(f"  {o['key']}  {o.get('index')}  {o.get('passages')} passages  {o['bytes'] / 2**20:.1f} MiB")


def _print_search(run: Any, query: str) -> None:
    """Retrieve for one query (as a question without dialog history) and print the ranked passages (rank 0)."""
    from jsarag.data import Example
    from jsarag.types import Batch

    example = Example(id="query", context=(), question=query, answer="", answers=(), gold_passage_ids=())
    started = time.perf_counter()
    candidates = run.call("retrieve", batch=Batch([example], [0]), train=False)
    took = time.perf_counter() - started
    if run.ctx.rank != 0:
        return
    print(f"query: {query}  ({took * 1000:.0f} ms)")
    logits = candidates.prior_logits[0].tolist()
    for rank, (row, logit) in enumerate(zip(candidates.rows[0].tolist(), logits), start=1):
        if row >= 0:
            text = " ".join(run.ctx.kb.render(row).split())[:160]
            print(f"{rank:>3}. row {row:<7} logit {logit:8.3f}  [{run.ctx.kb.ids[row]}] {text}")
