"""Index ``faiss``: exact inner-product search (``IndexFlatIP``) over the passage vectors."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from pydantic import Field

from jsarag import hookimpl
from jsarag.components import Component, Options, RunContext


class FaissOptions(Options):
    type: Literal["flat"] = "flat"
    """Index family; ``flat`` is exact inner product."""
    dir: Path | None = None
    """Where built indexes are cached (default: <cache>/indexes)."""
    threads: int = Field(0, ge=0)
    """FAISS OpenMP threads (0 = FAISS's default)."""


class FaissIndex(Component):
    """A FAISS index over unit-normalised passage vectors (inner product = cosine)."""

    kind = "index"
    Options = FaissOptions

    def __init__(self, options: FaissOptions, ctx: RunContext) -> None:
        super().__init__(options, ctx)
        self.index: faiss.Index | None = None
        if options.threads:
            faiss.omp_set_num_threads(options.threads)

    @property
    def folder(self) -> Path:
        """The cache folder for built indexes."""
        return self.options.dir or self.ctx.cache_dir / "indexes"

    def fingerprint_options(self) -> str:
        """Return the options that change what is built (part of the cache key)."""
        return f"faiss:{self.options.type}"

    def build(self, vectors: np.ndarray) -> None:
        """Build the index over (P, d) vectors."""
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, rows), each (B, k), best first."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def save(self, folder: Path) -> None:
        """Write the index into ``folder``."""
        faiss.write_index(self.index, str(folder / "index.faiss"))

    def load(self, folder: Path) -> None:
        """Read the index from ``folder``."""
        self.index = faiss.read_index(str(folder / "index.faiss"))


@hookimpl
def register_indexes(register) -> None:
    register("faiss", FaissIndex)
