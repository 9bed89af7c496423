"""Index ``torch_exact``: exact inner-product top-k by matrix product on the run's device, sharded across ranks.

Each of the W ranks holds a contiguous 1/W of the passage vectors on its device. ``search`` is a collective: the
queries of all ranks are all-gathered, every rank scores them against its shard (in blocks of ``block_size``
passages, so memory stays bounded), and the per-shard top-k are all-gathered and merged. A KB too big for one
device is thus searched exactly by the whole job; every rank must call ``search`` the same number of times
(the training loop and evaluation do). Ties are broken by the lower KB row, so the answer does not depend on W.
Nothing is saved beyond the cached ``vectors.npy`` the shards are read from.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from jsarag.api import Context, Index, IndexOptions, hookimpl
from jsarag_plugins.indexes.shards import best, shard_range, sharded_search

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchExactOptions(IndexOptions):
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage and matmul type of the shard (scores are merged in float32)."""
    block_size: int = Field(262_144, ge=1)
    """Passages scored per matrix product (bounds the (queries, block) score matrix)."""
    load_chunk: int = Field(65_536, ge=1)
    """Rows copied per chunk from the memory-mapped vectors to the device."""


class TorchExactIndex(Index):
    """Exact top-k over passage vectors sharded across the ranks of the run."""

    Options = TorchExactOptions
    sharded = True

    def __init__(self, options: TorchExactOptions, ctx: Context) -> None:
        super().__init__(options, ctx)
        self.shard: torch.Tensor | None = None  # (P_r, d) this rank's passages
        self.offset = 0  # KB row of the shard's first passage
        self.total = 0  # P: passages across all shards

    @property
    def ntotal(self) -> int:
        """Passages indexed, across all shards."""
        return self.total

    def fingerprint_options(self) -> str:
        """Return the options that change what is built (only the vectors: the shards are cut at load)."""
        return "torch_exact"

    def check_vectors(self, count: int, dim: int) -> None:
        """Any number of float vectors of any size fits."""

    def build(self, vectors: np.ndarray) -> None:
        """Take this rank's shard of the (P, d) vectors."""
        lo, hi = shard_range(len(vectors), self.ctx.rank, self.ctx.world_size)
        shard = torch.empty((hi - lo, vectors.shape[1]), dtype=DTYPES[self.options.dtype], device=self.ctx.device)
        for start in range(lo, hi, self.options.load_chunk):
            block = np.asarray(vectors[start : min(hi, start + self.options.load_chunk)])  # float16 or 32
            with warnings.catch_warnings():  # a read-only memmap: torch only reads it here
                warnings.simplefilter("ignore", UserWarning)
                shard[start - lo : start - lo + len(block)].copy_(torch.from_numpy(block))
        self.shard, self.offset, self.total = shard, lo, len(vectors)

    def save(self, folder: Path) -> None:
        """Nothing to write: the shards are cut from the folder's vectors.npy at load."""

    def load(self, folder: Path) -> None:
        """Take this rank's shard of the folder's memory-mapped vectors."""
        self.build(np.load(Path(folder) / "vectors.npy", mmap_mode="r"))

    @torch.no_grad()
    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, rows), each (B, k), best first; a collective when the run has several ranks."""
        mine = torch.as_tensor(queries).to(self.ctx.device, torch.float32)  # (B, d)
        return sharded_search(mine, k, self._local_top, self.ctx.rank, self.ctx.world_size)

    def _local_top(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, k) best scores and KB rows within this shard (-inf / -1 where the shard has fewer than k)."""
        n = len(queries)
        scores = torch.full((n, k), float("-inf"), device=queries.device)
        rows = torch.full((n, k), -1, dtype=torch.long, device=queries.device)
        q = queries.to(self.shard.dtype)
        for start in range(0, len(self.shard), self.options.block_size):
            block = (q @ self.shard[start : start + self.options.block_size].T).float()  # (N, b)
            top = block.topk(min(k, block.shape[1]), dim=1)
            scores, rows = best(torch.cat([scores, top.values], 1),
                                torch.cat([rows, top.indices + self.offset + start], 1), k)
        return scores, rows


@hookimpl
def register_indexes(register) -> None:
    register("torch_exact", TorchExactIndex)
