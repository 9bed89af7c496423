"""Passage embeddings and their index, built once per (knowledge base, passage encoder, index options) and cached:
the framework's side of ``Context.passage_index``.

The cache folder is keyed by a fingerprint of all three, so a changed KB or encoder gets a fresh build; a folder
whose recorded fingerprint disagrees with what the run expects is an error, never a silent wrong answer.
Every rank embeds its share of the KB into one memory-mapped ``vectors.npy`` (so a KB larger than RAM can be
embedded and indexed); rank 0 then builds the index, atomically (a temporary folder renamed into place), and all
ranks load it. The same machinery re-embeds the KB when a trained passage encoder asks for it (``live_step``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from tqdm.auto import tqdm

from jsarag.errors import IndexMismatchError
from jsarag.paths import confined

if TYPE_CHECKING:
    from jsarag.api import Context, Index

log = logging.getLogger("jsarag.passages")
PROGRESS_SECONDS = 30  # off a terminal, a line about the embedding at least this often
Encode = Callable[[list[str]], np.ndarray]  # texts -> (n, d) vectors


# -- the service: Context.passage_index ----------------------------------------------------------------------------

@dataclass
class PassageIndex:
    """The KB's passage vectors and a built index over them, ready to search."""

    index: Index  # the recipe's index component, loaded
    vectors: np.ndarray  # (P, d) memory-mapped: read only the rows you need (``vectors_of``)
    folder: Path  # the build folder (vectors.npy, the index files, meta.json)
    meta: dict[str, Any]  # what the folder was built for: kb, encoder, index, passages, dim, step (live builds)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k), best first, for (B, d) float32 queries."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """(*rows.shape, d) float32 vectors of KB rows (-1 gives zeros), reading only those rows of the memmap."""
        flat = rows.reshape(-1)
        unique, inverse = np.unique(np.maximum(flat, 0), return_inverse=True)
        block = np.asarray(self.vectors[unique], dtype=np.float32)  # (U, d): only these rows are read
        out = block[inverse].reshape(*rows.shape, block.shape[1])
        out[rows < 0] = 0.0
        return out

    @property
    def step(self) -> int:
        """The optimizer step a live build was embedded at (0 for a cached build of the initial encoder)."""
        step = self.meta.get("step", 0)
        if not isinstance(step, int):
            raise IndexMismatchError(f"{self.folder}/meta.json records no step; delete the folder to re-embed the KB")
        return step


def passage_index(ctx: Context, encoder: str, encode: Encode, batch_size: int,
                  live_step: int | None = None) -> PassageIndex:
    """Return the KB's vectors with the recipe's index over them, embedding and building them if needed.

    Without ``live_step`` the build is cached in the index folder by (KB, encoder, index options) and shared by
    every component of the run that asks for the same one. With ``live_step`` (a trained passage encoder) the KB is
    re-embedded now into ``<output_dir>/index-live/<role>``, replacing the previous live build. A collective.
    """
    index = ctx.new_index()
    if live_step is not None:
        target = live_folder(ctx)
        expected = live_expected(ctx, encoder, index)
        build_folder(ctx, index, target, {**expected, "step": live_step}, encode, batch_size, replace=True)
        return load(index, target, expected, len(ctx.kb))
    expected = {"kb": ctx.kb.fingerprint, "encoder": encoder, "index": index.fingerprint_options()}
    target = index_dir(index.options.dir, ctx) / index_fingerprint(*expected.values())
    if target not in ctx.loaded:
        if ctx.broadcast(not (target / "meta.json").exists()):
            build_folder(ctx, index, target, expected, encode, batch_size)
        ctx.loaded[target] = load(index, target, expected, len(ctx.kb))
    return ctx.loaded[target]


def live_passage_index(ctx: Context, encoder: str) -> PassageIndex | None:
    """The role's last live build in the run's folder (``passage_index(..., live_step=N)``), if there is one."""
    if not ctx.broadcast((live_folder(ctx) / "meta.json").exists()):
        return None
    index = ctx.new_index()
    return load(index, live_folder(ctx), live_expected(ctx, encoder, index), len(ctx.kb))


def live_folder(ctx: Context) -> Path:
    """Where a trained passage encoder of this role re-embeds the KB."""
    return ctx.output_dir / "index-live" / ctx.role


def live_expected(ctx: Context, encoder: str, index: Index) -> dict[str, str]:
    """What a live folder must have been built for: this KB, the role's encoder (trained from ``encoder``), index."""
    return {"kb": ctx.kb.fingerprint, "encoder": f"{encoder}+trained", "index": index.fingerprint_options()}


def index_dir(option: str | Path | None, ctx: Context) -> Path:
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


# -- building and loading -------------------------------------------------------------------------------------------

def index_fingerprint(kb_fingerprint: str, encoder_fingerprint: str, index_options: str) -> str:
    """Return the cache key of an index: the KB content, the passage encoder and the index options."""
    parts = json.dumps([kb_fingerprint, encoder_fingerprint, index_options]).encode()
    return hashlib.sha256(parts).hexdigest()[:20]


def build_folder(ctx: Context, index: Index, target: Path, meta: dict[str, Any], encode: Encode, batch_size: int,
                 replace: bool = False) -> None:
    """Embed the KB with every rank and build ``index`` into ``target`` (rank 0), atomically; all ranks call this."""
    tmp = ctx.broadcast(_make_tmp(target) if ctx.rank == 0 else None)
    if ctx.rank == 0:
        once = "" if replace else f"; done once: later runs load it from {target}"
        log.info("preparing the passage index: embedding %d passages of %s with %s on %d rank(s)%s", len(ctx.kb),
                 ctx.kb.path, meta["encoder"], ctx.world_size, once)
    started = time.perf_counter()
    try:
        embed_all(ctx, encode, batch_size, tmp / "vectors.npy", check=index.check_vectors)
    except BaseException:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def load(index: Index, target: Path, expected: dict[str, str], n_passages: int) -> PassageIndex:
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
    if index.ntotal != n_passages:
        raise IndexMismatchError(f"{target}: the index holds {index.ntotal} passages, the KB {n_passages}")
    log.info("loaded index %s (%d passages, dim %d)", target, vectors.shape[0], vectors.shape[1])
    return PassageIndex(index=index, vectors=vectors, folder=target, meta=meta)


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


def embed_all(ctx: Context, encode: Encode, batch_size: int, path: Path,
              check: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Embed every passage into a memory-mapped (P, d) float32 file, each rank its share; all ranks call this.

    Every rank makes the same number of ``encode`` calls of the same sizes (short shares are padded with
    repeated rows), so an encoder partitioned by ZeRO-3 may be used. ``check(P, d)`` runs on every rank once the
    first batch gives the vector size, before the rest of the KB is embedded (an index that cannot hold the vectors
    fails at once).
    """
    n = len(ctx.kb)
    lo, hi = shard_range(n, ctx.rank, ctx.world_size)
    share = -(-n // ctx.world_size)
    starts = range(0, share, batch_size)
    bar = tqdm(total=share, desc="embedding passages", unit="passage", mininterval=2,
               disable=ctx.rank != 0 or not sys.stderr.isatty())  # off a terminal: log lines (below)
    vectors, started = None, time.perf_counter()
    logged = started
    for start in starts:
        rows = [min(lo + start + i, n - 1) for i in range(min(batch_size, share - start))]
        block = np.asarray(encode([ctx.kb.render(r) for r in rows]), dtype=np.float32)  # (b, d)
        if vectors is None:
            if check is not None:
                check(n, block.shape[1])
            vectors = _open_shared(ctx, path, (n, block.shape[1]))
        keep = max(0, min(len(rows), hi - lo - start))
        vectors[lo + start : lo + start + keep] = block[:keep]
        bar.update(len(rows))
        done, now = start + len(rows), time.perf_counter()
        if ctx.rank == 0 and done < share and (start == 0 or bar.disable and now - logged >= PROGRESS_SECONDS):
            left = (now - started) / done * (share - done)
            log.info("embedded %d of %d passages; about %s left", done * ctx.world_size, n, _duration(left))
            logged = now
    bar.close()
    vectors.flush()
    ctx.barrier()
    return vectors


def _duration(seconds: float) -> str:
    """A time estimate in words: 40 s, 3 min, 1.5 h."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _open_shared(ctx: Context, path: Path, shape: tuple[int, int]) -> np.memmap:
    """Rank 0 creates the (P, d) file; every rank then opens it for writing its rows."""
    if ctx.rank == 0:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape).flush()
    ctx.barrier()
    return np.lib.format.open_memmap(path, mode="r+")


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
