"""Retriever ``dense``: a sentence-transformers bi-encoder, as the prior p(h|x) or (a second instance) the posterior.

The query encoder trains; the passage encoder is frozen by default, so passage vectors sit in a static, cached index
(memory-mapped: only the candidates' rows are read). Logits are cosine similarities over temperature τ.

With ``train_passages: true`` the passage encoder trains too (Atlas-style): candidates come from the (stale) index,
their logits from the live passage encoder, with gradient; the KB is re-embedded by all ranks on the ``refresh``
schedule into ``<output_dir>/index-live/<role>`` (and at the end of training), and ``rescore_pool`` re-ranks a
larger pool from the stale index with the live encoder in between. ``bm25_top_k`` adds BM25's top rows to the
training candidates (BM25 only proposes; the dense logits score them).
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from jsarag.api import (
    Context,
    Options,
    Retriever,
    Trainable,
    Truncations,
    hookimpl,
    loading,
    model_fingerprint,
    resolve_model,
    text_key,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from jsarag.api import PassageIndex

log = logging.getLogger("jsarag.dense")
Schedule = list[tuple[int, "int | None", int]]  # (start, end or None, every)


class DenseOptions(Options):
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Query encoder; also the passage encoder unless passage_model is set."""
    passage_model: str | None = None
    """A different passage encoder (must share the embedding size)."""
    temperature: float = Field(0.1, gt=0)
    """τ: logits are cosine / τ."""
    lr: float = Field(1e-5, ge=0)
    """Learning rate of the query encoder (0 freezes it)."""
    max_length: int = Field(256, ge=8)
    """Tokens kept by the encoders (queries and passages)."""
    embed_batch_size: int = Field(64, ge=1)
    """Passages per batch when embedding the KB."""
    embed_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute type of the passage encoder when embedding the KB (autocast): auto = bfloat16 on a GPU, float32 on
    the CPU. Part of the index's cache key."""
    vectors_dtype: Literal["float16", "float32"] = "float16"
    """Storage type of the KB's passage vectors (the memory-mapped vectors.npy): float16 halves disk and RAM."""
    train_passages: bool = False
    """Train the passage encoder too: candidate logits use the live encoder; the KB is re-embedded on ``refresh``."""
    passage_lr: float = Field(1e-5, ge=0)
    """Learning rate of the passage encoder when train_passages is on."""
    refresh: str | None = None
    """Re-embedding schedule of a trained passage encoder, Atlas-style: ``"0-1000:500,1000-:1000"`` re-embeds every
    500 steps before step 1000, then every 1000 (null = only at the end of training)."""
    rescore_pool: int = Field(0, ge=0)
    """Take this many rows from the stale index and keep the top-k by the live passage encoder (0 = off)."""
    bm25_top_k: int = Field(0, ge=0)
    """Add BM25's top-N rows for the query to the training candidates (0 = off)."""
    trust_remote_code: bool = False
    """Run Python code shipped in the encoder folders (their config's auto_map); off unless the recipe says so."""

    @model_validator(mode="after")
    def _rescore_needs_live_encoder(self) -> DenseOptions:
        if self.rescore_pool and not self.train_passages:
            raise ValueError("rescore_pool re-ranks with the live passage encoder: set train_passages: true")
        return self

    @field_validator("refresh")
    @classmethod
    def _check_refresh(cls, value: str | None) -> str | None:
        if value is not None:
            parse_refresh(value)
        return value


@dataclass
class Queries:
    """What ``encode`` returns: the unit query vectors and the texts they came from (BM25 extras read the texts)."""

    vectors: torch.Tensor  # (B, d), with gradient when the query encoder trains
    texts: list[str]


class DenseRetriever(Truncations, Retriever):
    """A bi-encoder over a passage index."""

    Options = DenseOptions

    def __init__(self, options: DenseOptions, ctx: Context) -> None:
        super().__init__(options, ctx)
        path = resolve_model(options.model)
        passage_path = resolve_model(options.passage_model) if options.passage_model else path
        self.passage_path = passage_path  # the passage encoder's model folder (export copies it when it is frozen)
        key = f"{ctx.role}.passage_model" if options.passage_model else f"{ctx.role}.model"
        self.passage_encoder = self._load(passage_path, options.passage_model or options.model, key)
        self.passage_encoder.requires_grad_(self.trains_passages)
        self.embed_dtype = options.embed_dtype if options.embed_dtype != "auto" else (
            "bfloat16" if ctx.device.type == "cuda" else "float32")
        precision = "" if self.embed_dtype == "float32" else f":{self.embed_dtype}"
        self.encoder_fingerprint = f"{model_fingerprint(passage_path)}:{options.max_length}{precision}"
        self.passages = self._initial_index()
        self.schedule = parse_refresh(options.refresh) if options.refresh else []
        if options.train_passages:
            self._adopt_live_index()
        self.query_encoder = self._load(path, options.model, f"{ctx.role}.model")
        self.bm25 = self._bm25() if options.bm25_top_k else None
        # distinct query texts (64-bit keys) cut at max_length; a set, so a resumed run counts what a straight one does
        self.truncated: dict[str, set[int]] = {"queries": set()}
        self.max_steps = 0  # set when training starts

    @property
    def trains_passages(self) -> bool:
        """Whether the passage encoder trains (its logits are then live, and the KB is re-embedded on schedule)."""
        return self.options.train_passages and self.options.passage_lr > 0

    def _load(self, path, name: str, key: str) -> SentenceTransformer:
        from sentence_transformers import SentenceTransformer

        with loading(name, key):
            model = SentenceTransformer(str(path), device=str(self.ctx.device),
                                        trust_remote_code=self.options.trust_remote_code)
        model.max_seq_length = self.options.max_length
        return model.eval()  # the engine switches trainable modules to train mode

    def _bm25(self):
        from jsarag_plugins.retrievers.bm25 import BM25Options, BM25Scorer

        return BM25Scorer(BM25Options(), self.ctx)

    def trainable(self) -> dict[str, Trainable]:
        modules = {"query_encoder": Trainable(self.query_encoder, self.options.lr)} if self.options.lr > 0 else {}
        if self.trains_passages:
            modules["passage_encoder"] = Trainable(self.passage_encoder, self.options.passage_lr)
        return modules

    # -- the retriever contract -------------------------------------------------------------------------------------

    def encode(self, texts: list[str]) -> Queries:
        self._note_truncated(texts)
        return Queries(self._vectors(self.query_encoder, texts), texts)

    def search(self, queries: Queries, k: int, train: bool) -> torch.Tensor:
        k = min(k, len(self.ctx.kb))
        rows = self._top(queries.vectors, k)  # (B, k)
        if train and self.bm25 is not None:
            from jsarag_plugins.retrievers.bm25 import union

            rows = union(rows, self.bm25.top(queries.texts, self.options.bm25_top_k))
        return rows

    def score(self, queries: Queries, rows: torch.Tensor) -> torch.Tensor:
        if self.trains_passages:
            vectors = self._live_vectors(rows).to(queries.vectors)  # (B, C, d), with gradient into the passage side
        else:
            vectors = torch.from_numpy(self.passages.vectors_of(rows.numpy())).to(queries.vectors)  # (B, C, d)
        logits = torch.einsum("bd,bcd->bc", queries.vectors, vectors) / self.options.temperature  # (B, C)
        return logits.masked_fill((rows < 0).to(logits.device), float("-inf"))

    def passage_index(self) -> PassageIndex:
        return self.passages

    def export(self, folder: Path, adapter: bool = False) -> dict[str, Any]:
        """Write the query encoder as a sentence-transformers folder and the passage encoder into its
        ``passage_encoder/``: a copy of its model folder when it stayed frozen (the run's index, keyed by those
        files, still fits it), else the trained encoder (the KB is then embedded again at the first search)."""
        passages = folder / "passage_encoder"
        self.query_encoder.save(str(folder))
        if self.trains_passages:
            self.passage_encoder.save(str(passages))
        else:
            shutil.copytree(self.passage_path, passages, ignore=shutil.ignore_patterns(".*"))
        return {"model": str(folder), "passage_model": str(passages), "train_passages": False}

    # -- encoding and searching ---------------------------------------------------------------------------------------

    def _vectors(self, model: SentenceTransformer, texts: list[str]) -> torch.Tensor:
        """(B, d) unit-normalised vectors, with gradient when the model trains."""
        from sentence_transformers.util import batch_to_device

        features = batch_to_device(model.preprocess(texts), self.ctx.device)
        return F.normalize(model(features)["sentence_embedding"], dim=-1)

    def _note_truncated(self, texts: list[str]) -> None:
        """Record the texts the encoder cuts at max_length (only texts with more bytes than that are tokenized again:
        a token covers at least one byte)."""
        special = 2  # [CLS] and [SEP], or their like
        long = [t for t in texts if len(t.encode("utf-8")) + special > self.options.max_length]
        if long:
            lengths = map(len, self.query_encoder.tokenizer(long, add_special_tokens=True, verbose=False)["input_ids"])
            self.truncated["queries"].update(text_key(t) for t, n in zip(long, lengths) if n > self.options.max_length)

    def _top(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) KB rows of the top-k for each query, best first (re-ranked by the live encoder with rescore_pool)."""
        if not self.options.rescore_pool:
            return self._search(queries, k)
        pool = self._search(queries, min(len(self.ctx.kb), max(k, self.options.rescore_pool)))  # (B, L)
        with torch.no_grad(), _eval_mode(self.passage_encoder):
            scores = torch.einsum("bd,bld->bl", queries.detach(), self._live_vectors(pool).to(queries))
            scores = scores.masked_fill((pool < 0).to(scores.device), float("-inf"))
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :k].cpu()
        return pool.gather(1, order)

    def _search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) KB rows of the index's top-k for each query."""
        _, rows = self.passages.search(queries.detach().float().cpu().numpy(), k)
        return torch.from_numpy(rows).long()

    def _live_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, C, d) live passage-encoder vectors of KB rows (zeros for -1), in one forward over the unique rows."""
        unique = sorted(set(rows[rows >= 0].tolist()))
        slot = {row: i for i, row in enumerate(unique)}
        encoded = self._vectors(self.passage_encoder, [self.ctx.kb.render(r) for r in unique])  # (U, d)
        encoded = torch.cat([encoded, encoded.new_zeros(1, encoded.shape[1])])  # row U: the empty slot
        where = torch.tensor([[slot.get(r, len(unique)) for r in row] for row in rows.tolist()], dtype=torch.long)
        return encoded[where.to(encoded.device)]

    @torch.no_grad()
    def _embed_passages(self, texts: list[str]) -> np.ndarray:
        with self._embed_precision():
            return self.passage_encoder.encode(texts, convert_to_numpy=True, normalize_embeddings=True,
                                               show_progress_bar=False, batch_size=len(texts))

    def _embed_precision(self) -> contextlib.AbstractContextManager:
        """Autocast the passage encoder to ``embed_dtype`` while it embeds the KB (nothing for float32)."""
        if self.embed_dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=getattr(torch, self.embed_dtype))

    # -- the index of a trained passage encoder ---------------------------------------------------------------------

    def _initial_index(self) -> PassageIndex:
        return self.ctx.passage_index(self.encoder_fingerprint, self._embed_passages, self.options.embed_batch_size,
                                      dtype=self.options.vectors_dtype)

    def _adopt_live_index(self) -> None:
        """Search the last refresh's index (in the run's folder) when there is one, e.g. to evaluate a trained run."""
        if not self.schedule:
            log.warning("train_passages without refresh: the index is only re-embedded at the end of training")
        live = self.ctx.live_passage_index(self.encoder_fingerprint, self.options.vectors_dtype)
        if live is not None:
            self.passages = live

    def refresh(self, step: int) -> None:
        """Re-embed the KB with the live passage encoder (every rank a share) and rebuild the index; a collective."""
        self.passages = self.ctx.passage_index(self.encoder_fingerprint, self._embed_live,
                                               self.options.embed_batch_size, live_step=step,
                                               dtype=self.options.vectors_dtype)
        log.info("re-embedded %d passages with the passage encoder of step %d", len(self.ctx.kb), step)

    @torch.no_grad()
    def _embed_live(self, texts: list[str]) -> np.ndarray:
        """(n, d) vectors from the trained passage encoder, in eval mode (no dropout), one forward per call."""
        with _eval_mode(self.passage_encoder), self._embed_precision():
            return self._vectors(self.passage_encoder, texts).float().cpu().numpy()

    def on_train_start(self, start_step: int, max_steps: int) -> None:
        self.max_steps = max_steps
        scheduled = last_refresh(self.schedule, start_step)
        if not self.options.train_passages or self.passages.step in (start_step, scheduled):
            return
        if start_step == 0:  # a fresh run in an output_dir with an old index-live: back to the initial index
            self.passages = self._initial_index()
            return
        log.warning("resuming at step %d with an index of step %d: re-embedding the KB", start_step,
                    self.passages.step)
        self.refresh(start_step)

    def on_step_end(self, step: int, loss: float, stats: dict[str, float]) -> None:
        if self.options.train_passages and refresh_due(self.schedule, step):
            self.refresh(step)

    def on_train_end(self, step: int, metrics: dict[str, Any]) -> None:
        if self.options.train_passages and step >= self.max_steps and self.passages.step != step:
            self.refresh(step)


# -- the refresh schedule -------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d*)\s*:\s*(\d+)\s*$")


def parse_refresh(text: str) -> Schedule:
    """Parse ``"0-1000:500,1000-:1000"`` into [(0, 1000, 500), (1000, None, 1000)]; ValueError names the bad part."""
    ranges = []
    for part in text.split(","):
        match = _RANGE.match(part)
        if not match or int(match[3]) == 0 or (match[2] and int(match[2]) <= int(match[1])):
            raise ValueError(f"refresh range '{part.strip()}' must look like START-END:EVERY or START-:EVERY "
                             "(END > START, EVERY > 0), e.g. \"0-1000:500,1000-:1000\"")
        ranges.append((int(match[1]), int(match[2]) if match[2] else None, int(match[3])))
    return ranges


def refresh_due(schedule: Schedule, step: int) -> bool:
    """Whether the schedule re-embeds the KB after optimizer step ``step`` (never at step 0: the initial build)."""
    return step > 0 and any(a <= step and (b is None or step < b) and step % every == 0 for a, b, every in schedule)


def last_refresh(schedule: Schedule, step: int) -> int:
    """The latest step <= ``step`` at which the schedule re-embedded the KB (0: the initial build)."""
    return next((s for s in range(step, 0, -1) if refresh_due(schedule, s)), 0)


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
