"""Retriever ``hashing``: what a third-party retriever plugin looks like.

Passages and queries become unit-normalised hashed bag-of-words vectors; the query side goes through a trainable
linear map (initialised to the identity), the passage side is fixed and indexed by whatever index the recipe picks.
It works as the prior, as the posterior (a second instance reading x [SEP] y) and with every estimator.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from jsarag.api import Context, Options, PassageIndex, Retriever, Trainable, hookimpl


class HashingOptions(Options):
    dim: int = Field(256, ge=8)
    """Hash buckets (vector size)."""
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


class HashingRetriever(Retriever):
    Options = HashingOptions

    def __init__(self, options: HashingOptions, ctx: Context) -> None:
        super().__init__(options, ctx)
        self.passages = ctx.passage_index(f"hashing-{options.dim}", lambda texts: hashed_bow(texts, options.dim),
                                          batch_size=256)
        self.query_map = torch.nn.Linear(options.dim, options.dim, bias=False)
        torch.nn.init.eye_(self.query_map.weight)

    def trainable(self) -> dict[str, Trainable]:
        return {"query_map": Trainable(self.query_map, self.options.lr)}

    def encode(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.query_map(torch.from_numpy(hashed_bow(texts, self.options.dim))), dim=-1)  # (B, d)

    def search(self, queries: torch.Tensor, k: int, train: bool) -> torch.Tensor:
        _, rows = self.passages.search(queries.detach().numpy(), k)
        return torch.from_numpy(rows).long()  # (B, k)

    def score(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        vectors = torch.from_numpy(self.passages.vectors_of(rows.numpy()))  # (B, C, d)
        logits = torch.einsum("bd,bcd->bc", queries, vectors) / self.options.temperature
        return logits.masked_fill(rows < 0, float("-inf"))  # (B, C)

    def passage_index(self) -> PassageIndex:
        return self.passages


@hookimpl
def register_retrievers(register) -> None:
    register("hashing", HashingRetriever)
