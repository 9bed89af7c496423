"""Retriever ``hashing``: what a third-party retriever plugin looks like.

Passages and queries become unit-normalised hashed bag-of-words vectors; the query side goes through a trainable
linear map (initialised to the identity), the passage side is fixed and indexed by whatever index the recipe picks.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from jsarag import hookimpl
from jsarag.components import Component, Options, RunContext, Trainable
from jsarag.data import render_query
from jsarag.passages import build_or_load
from jsarag.types import Batch, Candidates


class HashingOptions(Options):
    dim: int = Field(256, ge=8)
    """Hash buckets (vector size)."""
    top_k: int = Field(5, ge=1)
    """Candidates per example in training."""
    temperature: float = Field(0.1, gt=0)
    """Logits are cosine / temperature."""
    lr: float = Field(1e-3, ge=0)
    """Learning rate of the query map."""


def hashed_bow(texts: list[str], dim: int) -> np.ndarray:
    """(n, dim) unit-normalised hashed bag-of-words vectors."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % dim] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


class HashingRetriever(Component):
    kind = "retriever"
    Options = HashingOptions

    def __init__(self, options: HashingOptions, ctx: RunContext) -> None:
        super().__init__(options, ctx)
        self.index = ctx.components["index"]
        vectors = build_or_load(ctx, self.index, self.index.folder, f"hashing-{options.dim}",
                                lambda texts: hashed_bow(texts, options.dim), batch_size=256)
        self.passages = torch.from_numpy(np.array(vectors))  # (P, dim)
        self.query_map = torch.nn.Linear(options.dim, options.dim, bias=False)
        torch.nn.init.eye_(self.query_map.weight)

    def trainable(self) -> dict[str, Trainable]:
        return {"hashing_query": Trainable(self.query_map, self.options.lr)}

    @hookimpl
    def retrieve(self, batch: Batch, train: bool) -> Candidates:
        texts = [render_query(ex, self.ctx.recipe.data.max_history_turns) for ex in batch.examples]
        queries = F.normalize(self.query_map(torch.from_numpy(hashed_bow(texts, self.options.dim))), dim=-1)
        k = self.options.top_k if train else self.ctx.recipe.eval.top_k
        _, rows = self.index.search(queries.detach().numpy(), min(k, len(self.passages)))
        rows = torch.from_numpy(rows).long()  # (B, k)
        logits = torch.einsum("bd,bkd->bk", queries, self.passages[rows]) / self.options.temperature
        return Candidates(rows=rows, prior_logits=logits)


@hookimpl
def register_retrievers(register) -> None:
    register("hashing", HashingRetriever)
