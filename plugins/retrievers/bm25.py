"""Retriever ``bm25``: lexical BM25 (the ``bm25s`` library) as a non-trainable prior or a candidate source.

Alone (``retriever: {name: bm25}``) it is a fixed prior ``p(h|x) ∝ exp(BM25(x, h) / τ)``: its logits carry no
gradient and only the generator trains. When the estimator needs a posterior (jsa, vrag) the posterior is BM25 of
``x + y``, also fixed. The index section of the recipe is not used: the BM25 index is cached by (KB, options) in
``<cache>/bm25`` (or ``dir``). The dense retriever uses the same scorer to add BM25 candidates (``bm25_top_k``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Literal

import bm25s
import numpy as np
import torch
from pydantic import Field, field_validator

from jsarag import hookimpl
from jsarag.components import Component, Options, PathOption, RunContext
from jsarag.data import render_posterior_query, render_query
from jsarag.passages import broadcast, pad_rows, union_rows
from jsarag.paths import confined, stays_inside
from jsarag.types import Batch, Candidates

log = logging.getLogger("jsarag.bm25")


class BM25Options(Options):
    top_k: int = Field(10, ge=1)
    """Candidates from the prior (BM25 of x) in training."""
    posterior_top_k: int = Field(10, ge=1)
    """Candidates from the posterior (BM25 of x + y) in training, when the estimator needs one."""
    candidates: Literal["topk", "all"] = "topk"
    """``all`` scores the whole KB (small KBs: exact quantities)."""
    temperature: float = Field(1.0, gt=0)
    """τ: logits are BM25 scores / τ."""
    k1: float = Field(1.5, ge=0)
    """BM25 term-frequency saturation."""
    b: float = Field(0.75, ge=0, le=1)
    """BM25 length normalisation."""
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "lucene"
    """BM25 variant (bm25s naming)."""
    stopwords: str | None = "en"
    """Stop-word list removed before indexing (bm25s names, e.g. en; null = keep every word)."""
    stemmer: str | None = "english"
    """Snowball stemmer language (PyStemmer); null = no stemming."""
    posterior_sep: str = " "
    """Separator between x and y in the posterior's query."""
    dir: PathOption | None = None
    """Where the BM25 index is cached: null = <cache>/bm25; an absolute path; or a relative path, taken under
    output_dir (it may not climb out with '..')."""

    @field_validator("dir")
    @classmethod
    def _dir_stays_inside(cls, value: Path | None) -> Path | None:
        return None if value is None else stays_inside(value)


class BM25Scorer:
    """A BM25 index over the KB: every passage's score for a batch of queries, and their top-k rows."""

    def __init__(self, options: BM25Options, ctx: RunContext) -> None:
        self.options = options
        self.stemmer = _stemmer(options.stemmer)
        self.model = self._build_or_load(ctx)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(texts, stopwords=self.options.stopwords or [], stemmer=self.stemmer,
                              return_ids=False, show_progress=False)

    def _build_or_load(self, ctx: RunContext) -> bm25s.BM25:
        o = self.options
        settings = json.dumps([ctx.kb.fingerprint, o.k1, o.b, o.method, o.stopwords, o.stemmer, bm25s.__version__])
        folder = confined(o.dir, ctx.output_dir, "retriever.dir") if o.dir else ctx.cache_dir / "bm25"
        target = folder / hashlib.sha256(settings.encode()).hexdigest()[:20]
        if broadcast(ctx, not (target / "params.index.json").exists()) and ctx.rank == 0:
            model = bm25s.BM25(k1=o.k1, b=o.b, method=o.method)
            corpus = bm25s.tokenize([ctx.kb.render(i) for i in range(len(ctx.kb))], stopwords=o.stopwords or [],
                                    stemmer=self.stemmer, show_progress=False)
            model.index(corpus, show_progress=False)
            tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
            model.save(str(tmp), show_progress=False)
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("built the BM25 index of %d passages in %s", len(ctx.kb), target)
        ctx.barrier()
        return bm25s.BM25.load(str(target), show_progress=False)

    def scores(self, queries: list[str]) -> torch.Tensor:
        """(B, P) BM25 score of every passage for each query."""
        scores = [self.model.get_scores(tokens) for tokens in self._tokenize(queries)]
        return torch.from_numpy(np.stack(scores).astype(np.float32))

    def top(self, queries: list[str], k: int) -> torch.Tensor:
        """(B, k) KB rows of each query's top-k, best first."""
        return top_rows(self.scores(queries), k)


def top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) rows of the k best (B, P) scores, best first, ties by the lower row."""
    k = min(k, scores.shape[1])
    order = scores.neg().argsort(dim=1, stable=True)  # (B, P): stable, so equal scores keep row order
    return order[:, :k]


def pick(scores: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, C) scores of the given rows / τ, -inf on empty (-1) slots."""
    return (scores.gather(1, rows.clamp(min=0)) / temperature).masked_fill(rows < 0, float("-inf"))


def _stemmer(language: str | None):
    if language is None:
        return None
    import Stemmer  # PyStemmer

    return Stemmer.Stemmer(language)


class BM25Retriever(Component):
    """A fixed lexical prior (and posterior) over the KB."""

    kind = "retriever"
    Options = BM25Options

    def __init__(self, options: BM25Options, ctx: RunContext) -> None:
        super().__init__(options, ctx)
        self.max_turns = ctx.recipe.data.max_history_turns
        self.scorer = BM25Scorer(options, ctx)
        self.with_posterior = getattr(ctx.components.get("estimator"), "needs_posterior", False)

    @hookimpl
    def retrieve(self, batch: Batch, train: bool) -> Candidates:
        tau = self.options.temperature
        prior = self.scorer.scores([render_query(ex, self.max_turns) for ex in batch.examples])  # (B, P)
        if not train:
            rows = top_rows(prior, self.ctx.recipe.eval.top_k)
            return Candidates(rows=rows, prior_logits=pick(prior, rows, tau))
        post = None
        if self.with_posterior:
            sep = self.options.posterior_sep
            post = self.scorer.scores([render_posterior_query(ex, self.max_turns, sep) for ex in batch.examples])
        if self.options.candidates == "all":
            rows = torch.arange(prior.shape[1]).expand(len(batch), -1)  # (B, P)
        else:
            rows = top_rows(prior, self.options.top_k)  # (B, k_p)
            if post is not None:
                rows = union_rows(rows, top_rows(post, self.options.posterior_top_k))
            if batch.extra_rows:
                rows = union_rows(rows, pad_rows(batch.extra_rows))
        return Candidates(rows=rows, prior_logits=pick(prior, rows, tau),
                          posterior_logits=None if post is None else pick(post, rows, tau))


@hookimpl
def register_retrievers(register) -> None:
    register("bm25", BM25Retriever)
