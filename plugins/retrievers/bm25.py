"""Retriever ``bm25``: lexical BM25 (the ``bm25s`` library) as a fixed prior or posterior, or a candidate source.

As the prior it is ``p(h|x) ∝ exp(BM25(x, h) / τ)``; as the posterior (the default copy of the prior) BM25 of
``x [SEP] y``. Its logits carry no gradient: with a BM25 prior only the generator (and any dense posterior) trains.
The recipe's index section is not used: the BM25 index is cached by (KB, options) in ``<cache>/bm25`` (or ``dir``).
The dense retriever uses the same scorer to add BM25 candidates (``bm25_top_k``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from jsarag.api import Context, Options, OutputPath, Retriever, hookimpl

log = logging.getLogger("jsarag.bm25")


class BM25Options(Options):
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
    dir: OutputPath | None = None
    """Where the BM25 index is cached: null = <cache>/bm25; an absolute path; or a relative path, taken under
    output_dir (it may not climb out with '..')."""


class BM25Scorer:
    """A BM25 index over the KB: every passage's score for a batch of queries, and their top-k rows."""

    def __init__(self, options: BM25Options, ctx: Context) -> None:
        self.options = options
        self.stemmer = _stemmer(options.stemmer)
        self.model = self._build_or_load(ctx)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.options.stopwords or [], stemmer=self.stemmer,
                              return_ids=False, show_progress=False)

    def _build_or_load(self, ctx: Context):
        import bm25s

        o = self.options
        settings = json.dumps([ctx.kb.fingerprint, o.k1, o.b, o.method, o.stopwords, o.stemmer, bm25s.__version__])
        folder = ctx.path(o.dir, f"{ctx.role}.dir") if o.dir else ctx.cache_dir / "bm25"
        target = folder / hashlib.sha256(settings.encode()).hexdigest()[:20]
        if ctx.broadcast(not (target / "params.index.json").exists()) and ctx.rank == 0:
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


def union(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(B, C) per-example union of two (B, k) row lists, first's order kept, deduplicated, -1 padded."""
    merged = [list(dict.fromkeys(r for r in a + b if r >= 0)) for a, b in zip(first.tolist(), second.tolist())]
    width = max([1, *map(len, merged)])
    return torch.tensor([r + [-1] * (width - len(r)) for r in merged], dtype=torch.long)


def _stemmer(language: str | None):
    if language is None:
        return None
    import Stemmer  # PyStemmer

    return Stemmer.Stemmer(language)


@dataclass
class Queries:
    """What ``encode`` returns: the query texts, and every passage's BM25 score once computed."""

    texts: list[str]
    scores: torch.Tensor | None = field(default=None, repr=False)  # (B, P)


class BM25Retriever(Retriever):
    """A fixed lexical retriever over the KB."""

    Options = BM25Options

    def __init__(self, options: BM25Options, ctx: Context) -> None:
        super().__init__(options, ctx)
        self.scorer = BM25Scorer(options, ctx)

    def encode(self, texts: list[str]) -> Queries:
        return Queries(texts)

    def search(self, queries: Queries, k: int, train: bool) -> torch.Tensor:
        return top_rows(self._scores(queries), k)

    def score(self, queries: Queries, rows: torch.Tensor) -> torch.Tensor:
        scores = self._scores(queries).gather(1, rows.clamp(min=0)) / self.options.temperature  # (B, C)
        return scores.masked_fill(rows < 0, float("-inf"))

    def _scores(self, queries: Queries) -> torch.Tensor:
        if queries.scores is None:
            queries.scores = self.scorer.scores(queries.texts)
        return queries.scores


@hookimpl
def register_retrievers(register) -> None:
    register("bm25", BM25Retriever)
