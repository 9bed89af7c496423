"""Retriever ``dense``: sentence-transformers bi-encoders for the prior p(h|x) and the posterior q(h|x,y).

The query encoders train; the passage encoder is frozen, so passage vectors sit in a static, cached index.
Scores are cosine similarities over temperature τ. The posterior is built only when the estimator asks for it
(``needs_posterior``); it starts as a copy of the prior's query encoder and reads ``x [SEP] y``.
"""
from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import batch_to_device

from jsarag import hookimpl
from jsarag.components import Component, Options, RunContext, Trainable
from jsarag.data import render_posterior_query, render_query
from jsarag.models import model_fingerprint, resolve_model
from jsarag.passages import build_or_load
from jsarag.types import Batch, Candidates


class DenseOptions(Options):
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Prior query encoder; also the (frozen) passage encoder unless passage_model is set."""
    passage_model: str | None = None
    """A different passage encoder (must share the embedding size)."""
    top_k: int = Field(10, ge=1)
    """k_p: candidates from the prior in training (RAG's K)."""
    temperature: float = Field(0.1, gt=0)
    """τ: logits are cosine / τ."""
    lr: float = Field(1e-5, ge=0)
    """Learning rate of the prior query encoder (0 freezes it)."""
    max_length: int = Field(256, ge=8)
    """Query tokens kept by the encoders."""
    candidates: Literal["topk", "all"] = "topk"
    """``all`` scores the whole KB (small KBs: exact quantities)."""
    posterior_top_k: int = Field(10, ge=1)
    """k_q: candidates from the posterior in training."""
    posterior_lr: float = Field(1e-5, ge=0)
    """Learning rate of the posterior query encoder."""
    posterior_sep: str = " [SEP] "
    """Separator between x and y in the posterior's query."""
    share_posterior: bool = False
    """Posterior shares the prior's query-encoder weights instead of a copy."""
    embed_batch_size: int = Field(64, ge=1)
    """Passages per batch when building the index."""


class DenseRetriever(Component):
    """Prior (and posterior) bi-encoder over a frozen passage index."""

    kind = "retriever"
    Options = DenseOptions

    def __init__(self, options: DenseOptions, ctx: RunContext) -> None:
        super().__init__(options, ctx)
        self.max_turns = ctx.recipe.data.max_history_turns
        path = resolve_model(options.model)
        passage_path = resolve_model(options.passage_model) if options.passage_model else path
        self.passage_encoder = self._load(passage_path).requires_grad_(False)
        self.index = ctx.components["index"]
        fingerprint = f"{model_fingerprint(passage_path)}:{options.max_length}"
        vectors = build_or_load(ctx, self.index, self.index.folder, fingerprint, self._embed_passages,
                                options.embed_batch_size)
        self.passage_vectors = torch.from_numpy(np.array(vectors))  # (P, d), frozen
        self.prior = self._load(path)
        self.posterior = None
        if getattr(ctx.components.get("estimator"), "needs_posterior", False):
            self.posterior = self.prior if options.share_posterior else copy.deepcopy(self.prior)

    def _load(self, path) -> SentenceTransformer:
        model = SentenceTransformer(str(path), device=str(self.ctx.device), trust_remote_code=False)
        model.max_seq_length = self.options.max_length
        return model.eval()  # the engine switches trainable modules to train mode

    def trainable(self) -> dict[str, Trainable]:
        modules = {"prior": Trainable(self.prior, self.options.lr)} if self.options.lr > 0 else {}
        if self.posterior is not None and not self.options.share_posterior:
            modules["posterior"] = Trainable(self.posterior, self.options.posterior_lr)
        return modules

    @torch.no_grad()
    def _embed_passages(self, texts: list[str]) -> np.ndarray:
        return self.passage_encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True,
                                           show_progress_bar=False)

    def encode(self, model: SentenceTransformer, texts: list[str]) -> torch.Tensor:
        """(B, d) unit-normalised query vectors, with gradient when the model trains."""
        prepare = getattr(model, "preprocess", None) or model.tokenize  # `tokenize` before sentence-transformers 6
        features = batch_to_device(prepare(texts), self.ctx.device)
        return F.normalize(model(features)["sentence_embedding"], dim=-1)

    @hookimpl
    def retrieve(self, batch: Batch, train: bool) -> Candidates:
        queries = [render_query(ex, self.max_turns) for ex in batch.examples]
        prior_q = self.encode(self.prior, queries)  # (B, d)
        if not train:
            k = self.ctx.recipe.eval.top_k
            return self._candidates(self._top(prior_q, k), prior_q, None)
        if self.options.candidates == "all":
            rows = torch.arange(len(self.passage_vectors)).expand(len(batch), -1)  # (B, P)
        else:
            rows = self._top(prior_q, self.options.top_k)  # (B, k_p)
        posterior_q = None
        if self.posterior is not None:
            post = [render_posterior_query(ex, self.max_turns, self.options.posterior_sep) for ex in batch.examples]
            posterior_q = self.encode(self.posterior, post)
            if self.options.candidates == "topk":
                rows = union_rows(rows, self._top(posterior_q, self.options.posterior_top_k))
        if batch.extra_rows and self.options.candidates == "topk":
            width = max(map(len, batch.extra_rows))
            extra = torch.tensor([r + [-1] * (width - len(r)) for r in batch.extra_rows], dtype=torch.long)
            rows = union_rows(rows, extra.reshape(len(batch), -1))
        return self._candidates(rows, prior_q, posterior_q)

    def _top(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) KB rows of the index's top-k for each query, best first."""
        k = min(k, len(self.passage_vectors))
        _, rows = self.index.search(queries.detach().float().cpu().numpy(), k)
        return torch.from_numpy(rows).long()

    def _candidates(self, rows: torch.Tensor, prior_q: torch.Tensor, posterior_q: torch.Tensor | None) -> Candidates:
        vectors = self.passage_vectors[rows.clamp(min=0)].to(prior_q)  # (B, C, d)
        empty = rows < 0

        def logits(q: torch.Tensor) -> torch.Tensor:  # (B, C)
            scores = torch.einsum("bd,bcd->bc", q, vectors) / self.options.temperature
            return scores.masked_fill(empty.to(scores.device), float("-inf"))

        return Candidates(
            rows=rows,
            prior_logits=logits(prior_q),
            posterior_logits=None if posterior_q is None else logits(posterior_q),
        )


def union_rows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(B, C) per-example union of two (B, k) row lists, first's order kept, deduplicated, -1 padded."""
    merged = []
    for a, b in zip(first.tolist(), second.tolist()):
        merged.append(list(dict.fromkeys(r for r in a + b if r >= 0)))
    width = max(len(m) for m in merged)
    return torch.tensor([m + [-1] * (width - len(m)) for m in merged], dtype=torch.long)


@hookimpl
def register_retrievers(register) -> None:
    register("dense", DenseRetriever)
