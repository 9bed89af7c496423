"""Retriever ``bm25``: lexical BM25 (the ``bm25s`` library) as a fixed prior or posterior, or a candidate source.

As the prior it is ``p(h|x) ∝ exp(BM25(x, h) / τ)``; as the posterior (the default copy of the prior) BM25 of
``x [SEP] y``. Its logits carry no gradient: with a BM25 prior only the generator (and any dense posterior) trains.
The recipe's index section is not used: the BM25 index is cached by (KB, options) in ``<cache>/bm25`` (or ``dir``)
and loaded memory-mapped. ``search`` takes bm25s's own top-k (a partial selection, not a sort of every passage);
``score`` reads only the given rows' entries of the sparse (token, passage) score matrix, so neither scores all P
passages per query. The dense retriever uses the same scorer to add BM25 candidates (``bm25_top_k``).
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
    """A BM25 index over the KB, memory-mapped: each query's top-k rows (bm25s's own top-k selection), and the
    scores of given rows read from the sparse (token, passage) score matrix, never a score for every passage."""

    def __init__(self, options: BM25Options, ctx: Context) -> None:
        self.options = options
        self.stemmer = _stemmer(options.stemmer)
        self.model = self._build_or_load(ctx)
        self.passages = int(self.model.scores["num_docs"])

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
            _check_sorted_postings(model.scores)
            tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
            model.save(str(tmp), show_progress=False)
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("built the BM25 index of %d passages in %s", len(ctx.kb), target)
        ctx.barrier()
        return bm25s.BM25.load(str(target), mmap=True, show_progress=False)

    def token_ids(self, queries: list[str]) -> list[np.ndarray]:
        """Each query's known token ids, repeats kept (BM25 counts a repeated query term again)."""
        return [np.asarray(self.model.get_tokens_ids(tokens), dtype=np.int64) for tokens in self._tokenize(queries)]

    def top(self, queries: list[str], k: int) -> torch.Tensor:
        """(B, k) KB rows of each query's top-k, best first (equal scores within the k: the lower row first)."""
        k = min(k, self.passages)
        rows, scores = self.model.retrieve(self._tokenize(queries), k=k, show_progress=False)  # (B, k) each
        return torch.from_numpy(_by_score_then_row(np.asarray(rows), np.asarray(scores)))

    def scores_of(self, tokens: list[np.ndarray], rows: torch.Tensor) -> torch.Tensor:
        """(B, C) BM25 scores of the given (B, C) KB rows (0 for -1), read from the postings of the queries' tokens."""
        data, indices, indptr = (self.model.scores[key] for key in ("data", "indices", "indptr"))
        wanted = rows.clamp(min=0).numpy()
        out = np.zeros(wanted.shape, dtype=np.float32)
        for b, ids in enumerate(tokens):
            for token in ids.tolist():  # in query order, in float32: the sums bm25s's get_scores makes
                start, end = int(indptr[token]), int(indptr[token + 1])
                if end == start:
                    continue
                postings = indices[start:end]  # (L,) the passages holding the token, ascending
                at = np.minimum(np.searchsorted(postings, wanted[b]), end - start - 1)  # (C,)
                out[b] += np.where(postings[at] == wanted[b], data[start:end][at], 0).astype(np.float32)
            if self.model.nonoccurrence_array is not None:  # bm25l / bm25+: every passage's floor for the terms
                out[b] += self.model.nonoccurrence_array[ids].sum()
        return torch.from_numpy(out)


def _by_score_then_row(rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(B, k) rows re-ordered best score first, equal scores by the lower row."""
    order = np.lexsort((rows, -scores), axis=-1)
    return np.take_along_axis(rows, order, axis=1).astype(np.int64)


def _check_sorted_postings(scores: dict) -> None:
    """Refuse a score matrix whose postings are not in ascending passage order (``scores_of`` bisects them)."""
    indices, indptr = np.asarray(scores["indices"], dtype=np.int64), np.asarray(scores["indptr"])
    falls = np.flatnonzero(np.diff(indices) <= 0) + 1  # where a posting does not follow a larger passage row
    if not np.isin(falls, indptr).all():
        raise RuntimeError("bm25s wrote postings out of passage order, which the bm25 retriever cannot bisect")


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
    """What ``encode`` returns: the query texts, and their known token ids once needed."""

    texts: list[str]
    tokens: list[np.ndarray] | None = field(default=None, repr=False)


class BM25Retriever(Retriever):
    """A fixed lexical retriever over the KB."""

    Options = BM25Options

    def __init__(self, options: BM25Options, ctx: Context) -> None:
        super().__init__(options, ctx)
        self.scorer = BM25Scorer(options, ctx)

    def encode(self, texts: list[str]) -> Queries:
        return Queries(texts)

    def search(self, queries: Queries, k: int, train: bool) -> torch.Tensor:
        return self.scorer.top(queries.texts, k)

    def score(self, queries: Queries, rows: torch.Tensor) -> torch.Tensor:
        if queries.tokens is None:
            queries.tokens = self.scorer.token_ids(queries.texts)
        scores = self.scorer.scores_of(queries.tokens, rows) / self.options.temperature  # (B, C)
        return scores.masked_fill(rows < 0, float("-inf"))


@hookimpl
def register_retrievers(register) -> None:
    register("bm25", BM25Retriever)
