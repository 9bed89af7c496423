"""The ``retrieve`` hook point: the candidate set C(x, y), built by the framework from the run's retrievers.

    C = prior top-k_p(x) ∪ posterior top-k_q(x [SEP] y) ∪ the estimator's extra rows     (deduplicated, in that order)

with the prior's and the posterior's logits over all of C (each retriever's ``score``), so that p̃(h|x) and
q̃(h|x,y) can be renormalised over the same set. ``candidates.mode: all`` makes every KB passage a candidate (small
KBs: every quantity exact). At evaluation C is the prior's top-k alone, ranked.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from jsarag.api import Batch, Candidates, Retriever
from jsarag.data import render_posterior_query, render_query

if TYPE_CHECKING:
    from jsarag.recipe import CandidatesConfig


def candidate_set(batch: Batch, prior: Retriever, posterior: Retriever | None, config: CandidatesConfig,
                  kb_size: int, history_turns: int, extra_rows: list[list[int]]) -> Candidates:
    """The training candidates of a micro-batch, with both retrievers' logits over them."""
    prior_q = prior.encode([render_query(ex, history_turns) for ex in batch.examples])
    posterior_q = None
    if posterior is not None:
        texts = [render_posterior_query(ex, history_turns, config.posterior_sep) for ex in batch.examples]
        posterior_q = posterior.encode(texts)
    if config.mode == "all":
        rows = torch.arange(kb_size).expand(len(batch), -1)  # (B, P)
    else:
        rows = prior.search(prior_q, min(config.prior_top_k, kb_size), train=True)  # (B, k_p')
        if posterior is not None:
            rows = union_rows(rows, posterior.search(posterior_q, min(config.posterior_top_k, kb_size), train=True))
        if any(extra_rows):
            rows = union_rows(rows, pad_rows(extra_rows))
    return Candidates(rows=rows, prior_logits=prior.score(prior_q, rows),
                      posterior_logits=None if posterior is None else posterior.score(posterior_q, rows))


def ranked(batch: Batch, prior: Retriever, k: int, history_turns: int) -> Candidates:
    """The prior's top-k passages of each example, best first, with their logits (evaluation and search)."""
    queries = prior.encode([render_query(ex, history_turns) for ex in batch.examples])
    rows = prior.search(queries, k, train=False)[:, :k]  # (B, k)
    return Candidates(rows=rows, prior_logits=prior.score(queries, rows))


def clamped_top_k(settings: dict[str, int], kb_size: int) -> dict[str, int]:
    """The top-k settings (recipe key -> k) larger than the KB, each with the k used: the KB's size (candidate_set,
    ranked and evaluation take min(k, P); a run counts and reports these)."""
    return {key: kb_size for key, k in settings.items() if k > kb_size}


def pad_rows(rows: list[list[int]]) -> torch.Tensor:
    """(B, C) long tensor of per-example row lists, -1 padded (C >= 1)."""
    width = max([1, *map(len, rows)])
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)


def union_rows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(B, C) per-example union of two (B, k) row lists, first's order kept, deduplicated, -1 padded."""
    merged = [list(dict.fromkeys(r for r in a + b if r >= 0)) for a, b in zip(first.tolist(), second.tolist())]
    return pad_rows(merged)
