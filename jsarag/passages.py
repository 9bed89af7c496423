"""Passage embeddings and their index, built once per (knowledge base, passage encoder, index options) and cached.

The cache folder is keyed by a fingerprint of all three, so a changed KB or encoder gets a fresh build; a folder
whose recorded fingerprint disagrees with what the run expects is an error, never a silent wrong answer.
Rank 0 builds (atomically: a temporary folder renamed into place), the other ranks wait and load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
from tqdm.auto import tqdm

from jsarag.components import RunContext
from jsarag.errors import IndexMismatchError

log = logging.getLogger("jsarag.passages")


class Index(Protocol):
    """What the retriever needs of an index component."""

    def fingerprint_options(self) -> str: ...
    def build(self, vectors: np.ndarray) -> None: ...
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...


def index_fingerprint(kb_fingerprint: str, encoder_fingerprint: str, index_options: str) -> str:
    """Return the cache key of an index: the KB content, the passage encoder and the index options."""
    parts = json.dumps([kb_fingerprint, encoder_fingerprint, index_options]).encode()
    return hashlib.sha256(parts).hexdigest()[:20]


def build_or_load(
    ctx: RunContext,
    index: Index,
    folder: Path,
    encoder_fingerprint: str,
    encode: Callable[[list[str]], np.ndarray],
    batch_size: int,
) -> np.ndarray:
    """Return the (P, d) passage vectors with ``index`` ready to search, building them on rank 0 if needed."""
    expected = {"kb": ctx.kb.fingerprint, "encoder": encoder_fingerprint, "index": index.fingerprint_options()}
    key = index_fingerprint(*expected.values())
    target = folder / key
    if ctx.rank == 0 and not (target / "meta.json").exists():
        _build(ctx, index, target, expected, encode, batch_size)
    ctx.barrier()
    return load(index, target, expected, len(ctx.kb))


def load(index: Index, target: Path, expected: dict[str, str], n_passages: int) -> np.ndarray:
    """Load a built index folder after checking it was built for this KB, encoder and index."""
    meta = json.loads((target / "meta.json").read_text())
    for what, value in expected.items():
        if meta.get(what) != value:
            raise IndexMismatchError(
                f"{target}: index built for another {what} (recorded {meta.get(what)}, this run has {value}); "
                "delete the folder or point index.dir elsewhere to rebuild"
            )
    vectors = np.load(target / "vectors.npy", mmap_mode="r")
    if vectors.shape[0] != n_passages:
        raise IndexMismatchError(f"{target}: {vectors.shape[0]} vectors for a KB of {n_passages} passages")
    index.load(target)
    log.info("loaded index %s (%d passages, dim %d)", target, vectors.shape[0], vectors.shape[1])
    return np.asarray(vectors)


def _build(ctx, index: Index, target: Path, meta: dict, encode, batch_size: int) -> None:
    log.info("embedding %d passages into %s", len(ctx.kb), target)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vectors = embed_all(ctx, encode, batch_size, tmp / "vectors.npy")
    index.build(vectors)
    index.save(tmp)
    dim = int(vectors.shape[1])
    (tmp / "meta.json").write_text(json.dumps({**meta, "passages": len(ctx.kb), "dim": dim}, indent=2))
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def embed_all(ctx: RunContext, encode, batch_size: int, path: Path) -> np.ndarray:
    """Embed every passage in batches into a memory-mapped (P, d) float32 file."""
    vectors = None
    rows = range(0, len(ctx.kb), batch_size)
    for start in tqdm(rows, desc="embedding passages", unit="batch", disable=ctx.rank != 0):
        texts = [ctx.kb.render(i) for i in range(start, min(start + batch_size, len(ctx.kb)))]
        block = np.asarray(encode(texts), dtype=np.float32)  # (b, d)
        if vectors is None:
            vectors = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(ctx.kb), block.shape[1]))
        vectors[start : start + len(texts)] = block
    vectors.flush()
    return vectors
