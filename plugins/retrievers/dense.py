"""Retriever ``dense``: sentence-transformers bi-encoders for the prior p(h|x) and the posterior q(h|x,y).

The query encoders train; the passage encoder is frozen by default, so passage vectors sit in a static, cached
index (memory-mapped: only the candidates' rows are read). Scores are cosine similarities over temperature τ. The
posterior is built only when the estimator asks for it (``needs_posterior``); it starts as a copy of the prior's
query encoder and reads ``x [SEP] y``.

With ``train_passages: true`` the passage encoder trains too (Atlas-style): candidates come from the (stale) index,
their logits from the live passage encoder, with gradient; the KB is re-embedded by all ranks on the index's
``refresh`` schedule into ``<output_dir>/index-live`` (and at the end of training), and ``rescore_pool`` re-ranks a
larger pool from the stale index with the live encoder in between. ``bm25_top_k`` adds BM25's top rows to the
training candidates (BM25 only proposes; the dense logits score them).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import batch_to_device

from jsarag import hookimpl
from jsarag.components import Component, Options, RunContext, Trainable, Truncations
from jsarag.data import render_posterior_query, render_query, text_key
from jsarag.errors import IndexMismatchError
from jsarag.models import loading, model_fingerprint, resolve_model
from jsarag.passages import (broadcast, build_folder, build_or_load, gather_rows, last_refresh, load, pad_rows,
                             read_meta, refresh_due, union_rows)
from jsarag.types import Batch, Candidates

log = logging.getLogger("jsarag.dense")
__all__ = ["DenseOptions", "DenseRetriever", "union_rows"]


class DenseOptions(Options):
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Prior query encoder; also the passage encoder unless passage_model is set."""
    passage_model: str | None = None
    """A different passage encoder (must share the embedding size)."""
    top_k: int = Field(10, ge=1)
    """k_p: candidates from the prior in training (RAG's K)."""
    temperature: float = Field(0.1, gt=0)
    """τ: logits are cosine / τ."""
    lr: float = Field(1e-5, ge=0)
    """Learning rate of the prior query encoder (0 freezes it)."""
    max_length: int = Field(256, ge=8)
    """Tokens kept by the encoders (queries and passages)."""
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
    """Passages per batch when embedding the KB."""
    train_passages: bool = False
    """Train the passage encoder too: candidate logits use the live encoder; the KB is re-embedded on index.refresh."""
    passage_lr: float = Field(1e-5, ge=0)
    """Learning rate of the passage encoder when train_passages is on."""
    rescore_pool: int = Field(0, ge=0)
    """Take this many rows from the stale index and keep the top-k by the live passage encoder (0 = off)."""
    bm25_top_k: int = Field(0, ge=0)
    """Add BM25's top-N rows for the query x to the training candidates (0 = off)."""
    trust_remote_code: bool = False
    """Run Python code shipped in the encoder folders (their config's auto_map); off unless the recipe says so."""

    @model_validator(mode="after")
    def _rescore_needs_live_encoder(self) -> DenseOptions:
        if self.rescore_pool and not self.train_passages:
            raise ValueError("rescore_pool re-ranks with the live passage encoder: set train_passages: true")
        return self


class DenseRetriever(Truncations, Component):
    """Prior (and posterior) bi-encoder over a passage index."""

    kind = "retriever"
    Options = DenseOptions

    def __init__(self, options: DenseOptions, ctx: RunContext) -> None:
        super().__init__(options, ctx)
        self.max_turns = ctx.recipe.data.max_history_turns
        path = resolve_model(options.model)
        passage_path = resolve_model(options.passage_model) if options.passage_model else path
        trains_passages = options.train_passages and options.passage_lr > 0
        self.passage_encoder = self._load(passage_path, options.passage_model or options.model,
                                          "retriever.passage_model" if options.passage_model else "retriever.model")
        self.passage_encoder.requires_grad_(trains_passages)
        self.index = ctx.components["index"]
        self.encoder_fingerprint = f"{model_fingerprint(passage_path)}:{options.max_length}"
        self.vectors = self._initial_vectors()  # (P, d) memmap
        self.index_step = 0  # optimizer step of the passage encoder the index was embedded with
        if options.train_passages:
            self._adopt_live_index()
        self.prior = self._load(path, options.model, "retriever.model")
        self.posterior = None
        if getattr(ctx.components.get("estimator"), "needs_posterior", False):
            self.posterior = self.prior if options.share_posterior else copy.deepcopy(self.prior)
        self.bm25 = self._bm25() if options.bm25_top_k else None
        # distinct query texts (64-bit keys) cut at max_length; a set, so a resumed run counts what a straight one does
        self.truncated: dict[str, set[int]] = {"queries": set(), "posterior_queries": set()}

    def _load(self, path, name: str, key: str) -> SentenceTransformer:
        with loading(name, key):
            model = SentenceTransformer(str(path), device=str(self.ctx.device),
                                        trust_remote_code=self.options.trust_remote_code)
        model.max_seq_length = self.options.max_length
        return model.eval()  # the engine switches trainable modules to train mode

    def _bm25(self):
        from jsarag_plugins.retrievers.bm25 import BM25Options, BM25Scorer

        return BM25Scorer(BM25Options(), self.ctx)

    def _note_truncated(self, what: str, model: SentenceTransformer, texts: list[str]) -> None:
        """Record the texts the encoder cuts at max_length (only texts with more bytes than that are tokenized again:
        a token covers at least one byte)."""
        special = 2  # [CLS] and [SEP], or their like
        long = [t for t in texts if len(t.encode("utf-8")) + special > self.options.max_length]
        if long:
            lengths = map(len, model.tokenizer(long, add_special_tokens=True, verbose=False)["input_ids"])
            self.truncated[what].update(text_key(t) for t, n in zip(long, lengths) if n > self.options.max_length)

    def trainable(self) -> dict[str, Trainable]:
        modules = {"prior": Trainable(self.prior, self.options.lr)} if self.options.lr > 0 else {}
        if self.posterior is not None and not self.options.share_posterior:
            modules["posterior"] = Trainable(self.posterior, self.options.posterior_lr)
        if self.options.train_passages and self.options.passage_lr > 0:
            modules["passage_encoder"] = Trainable(self.passage_encoder, self.options.passage_lr)
        return modules

    @torch.no_grad()
    def _embed_passages(self, texts: list[str]) -> np.ndarray:
        return self.passage_encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True,
                                           show_progress_bar=False)

    def encode(self, model: SentenceTransformer, texts: list[str]) -> torch.Tensor:
        """(B, d) unit-normalised vectors, with gradient when the model trains."""
        prepare = getattr(model, "preprocess", None) or model.tokenize  # `tokenize` before sentence-transformers 6
        features = batch_to_device(prepare(texts), self.ctx.device)
        return F.normalize(model(features)["sentence_embedding"], dim=-1)

    # -- retrieval --------------------------------------------------------------------------------------------------

    @hookimpl
    def retrieve(self, batch: Batch, train: bool) -> Candidates:
        queries = [render_query(ex, self.max_turns) for ex in batch.examples]
        self._note_truncated("queries", self.prior, queries)
        prior_q = self.encode(self.prior, queries)  # (B, d)
        if not train:
            rows = self._top(prior_q, self.ctx.recipe.eval.top_k)
            return self._candidates(rows, prior_q, None, live=self.options.rescore_pool > 0)
        topk = self.options.candidates == "topk"
        every_row = torch.arange(len(self.vectors)).expand(len(batch), -1)  # (B, P) with candidates: all
        rows = self._top(prior_q, self.options.top_k) if topk else every_row
        posterior_q = None
        if self.posterior is not None:
            post = [render_posterior_query(ex, self.max_turns, self.options.posterior_sep) for ex in batch.examples]
            self._note_truncated("posterior_queries", self.posterior, post)
            posterior_q = self.encode(self.posterior, post)
            if topk:
                rows = union_rows(rows, self._top(posterior_q, self.options.posterior_top_k))
        if topk:
            rows = self._add_extra(rows, batch, queries)
        return self._candidates(rows, prior_q, posterior_q, live=self.options.train_passages)

    def _add_extra(self, rows: torch.Tensor, batch: Batch, queries: list[str]) -> torch.Tensor:
        """Union in BM25's top rows and the rows other plugins asked for (a sampler's cached state, say)."""
        if self.bm25 is not None:
            rows = union_rows(rows, self.bm25.top(queries, self.options.bm25_top_k))
        if batch.extra_rows:
            rows = union_rows(rows, pad_rows(batch.extra_rows))
        return rows

    def _top(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) KB rows of the top-k for each query, best first (re-ranked by the live encoder with rescore_pool)."""
        k = min(k, len(self.vectors))
        if not self.options.rescore_pool:
            return self._search(queries, k)
        pool = self._search(queries, min(len(self.vectors), max(k, self.options.rescore_pool)))  # (B, L)
        with torch.no_grad(), _eval_mode(self.passage_encoder):
            scores = torch.einsum("bd,bld->bl", queries.detach(), self._live_vectors(pool).to(queries))
            scores = scores.masked_fill((pool < 0).to(scores.device), float("-inf"))
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :k].cpu()
        return pool.gather(1, order)

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) KB rows of the index's top-k for each query."""
        _, rows = self.index.search(queries.detach().float().cpu().numpy(), k)
        return torch.from_numpy(rows).long()

    def _candidates(self, rows: torch.Tensor, prior_q: torch.Tensor, posterior_q: torch.Tensor | None,
                    live: bool) -> Candidates:
        if live:
            vectors = self._live_vectors(rows).to(prior_q)  # (B, C, d), with gradient into the passage encoder
        else:
            vectors = torch.from_numpy(gather_rows(self.vectors, rows.numpy())).to(prior_q)  # (B, C, d)
        empty = rows < 0

        def logits(q: torch.Tensor) -> torch.Tensor:  # (B, C)
            scores = torch.einsum("bd,bcd->bc", q, vectors) / self.options.temperature
            return scores.masked_fill(empty.to(scores.device), float("-inf"))

        return Candidates(
            rows=rows,
            prior_logits=logits(prior_q),
            posterior_logits=None if posterior_q is None else logits(posterior_q),
        )

    def _live_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, C, d) live passage-encoder vectors of KB rows (zeros for -1), in one forward over the unique rows."""
        unique = sorted(set(rows[rows >= 0].tolist()))
        slot = {row: i for i, row in enumerate(unique)}
        encoded = self.encode(self.passage_encoder, [self.ctx.kb.render(r) for r in unique])  # (U, d)
        encoded = torch.cat([encoded, encoded.new_zeros(1, encoded.shape[1])])  # row U: the empty slot
        where = torch.tensor([[slot.get(r, len(unique)) for r in row] for row in rows.tolist()], dtype=torch.long)
        return encoded[where.to(encoded.device)]

    # -- the index of a trained passage encoder ---------------------------------------------------------------------

    @property
    def live_folder(self):
        """Where the re-embedded KB and its index go when the passage encoder trains."""
        return self.ctx.output_dir / "index-live"

    def _initial_vectors(self) -> np.ndarray:
        return build_or_load(self.ctx, self.index, self.index.folder, self.encoder_fingerprint, self._embed_passages,
                             self.options.embed_batch_size)

    def _live_expected(self) -> dict[str, str]:
        """What an index-live folder must have been built for: this KB, this run's passage encoder (trained from
        ``encoder_fingerprint``) and this index type."""
        return {"kb": self.ctx.kb.fingerprint, "encoder": f"{self.encoder_fingerprint}+trained",
                "index": self.index.fingerprint_options()}

    def _adopt_live_index(self) -> None:
        """Search the last refresh's index (output_dir/index-live) when there is one, e.g. to evaluate a trained run."""
        if not getattr(self.index, "refresh_schedule", None):
            log.warning("train_passages without index.refresh: the index is only re-embedded at the end of training")
        if broadcast(self.ctx, (self.live_folder / "meta.json").exists()):
            self.vectors = load(self.index, self.live_folder, self._live_expected(), len(self.ctx.kb))
            self.index_step = _live_step(self.live_folder)

    def refresh(self, step: int) -> None:
        """Re-embed the KB with the live passage encoder (every rank a share) and rebuild the index; a collective."""
        meta = {**self._live_expected(), "step": step}
        build_folder(self.ctx, self.index, self.live_folder, meta, self._embed_live, self.options.embed_batch_size,
                     replace=True)
        self.vectors = load(self.index, self.live_folder, self._live_expected(), len(self.ctx.kb))
        self.index_step = step
        log.info("re-embedded %d passages with the passage encoder of step %d", len(self.ctx.kb), step)

    @torch.no_grad()
    def _embed_live(self, texts: list[str]) -> np.ndarray:
        """(n, d) vectors from the trained passage encoder, in eval mode (no dropout), one forward per call."""
        with _eval_mode(self.passage_encoder):
            return self.encode(self.passage_encoder, texts).float().cpu().numpy()

    @hookimpl
    def on_train_start(self, config: Any, start_step: int, max_steps: int) -> None:
        if not self.options.train_passages or self.index_step in (start_step, self._scheduled(start_step)):
            return
        if start_step == 0:  # a fresh run in an output_dir with an old index-live: back to the initial index
            self.vectors, self.index_step = self._initial_vectors(), 0
            return
        log.warning("resuming at step %d with an index of step %d: re-embedding the KB", start_step, self.index_step)
        self.refresh(start_step)

    def _scheduled(self, step: int) -> int:
        return last_refresh(getattr(self.index, "refresh_schedule", []), step)

    @hookimpl
    def on_step_end(self, step: int, loss: float, stats: dict[str, float]) -> None:
        if self.options.train_passages and refresh_due(getattr(self.index, "refresh_schedule", []), step):
            self.refresh(step)

    @hookimpl
    def on_train_end(self, step: int, metrics: dict[str, Any]) -> None:
        if self.options.train_passages and step >= self.ctx.recipe.train.max_steps and self.index_step != step:
            self.refresh(step)


def _live_step(folder) -> int:
    """The optimizer step an index-live folder was embedded at (from its meta.json)."""
    step = read_meta(folder).get("step")
    if not isinstance(step, int):
        raise IndexMismatchError(f"{folder}/meta.json records no step; delete the folder to re-embed the KB")
    return step


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run a block with ``module`` in eval mode (no dropout), then restore its mode."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


@hookimpl
def register_retrievers(register) -> None:
    register("dense", DenseRetriever)
