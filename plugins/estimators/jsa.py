"""Estimator ``jsa``: JSA-RAG, joint stochastic approximation with a Metropolis independence sampler (MIS).

Targets: maximise log p(y|x) for the generator and the prior, minimise the inclusive KL(p(h|x,y) ‖ q(h|x,y)) for the
posterior. Both gradients are expectations under the true posterior p(h|x,y) ∝ p̃(h|x) p(y|x,h), estimated by a
chain whose proposal is the posterior retriever q̃:

1. draw m proposals h'_1..h'_m ~ q̃ (with replacement);
2. score log p(y|x,h) once for each unique passage among the proposals and the cached state (no gradient);
3. from the cached state h (or the first proposal), accept h' with prob. min{1, [p̃(h') p(y|h') q̃(h)] / [p̃(h) p(y|h) q̃(h')]};
4. weight w_h = share of the m chain states equal to h (``use: all``) or the last state only (``use: last``);
5. loss = Σ_h w_h [-log p(y|x,h) - log p̃(h|x) - log q̃(h|x,y)], re-scoring with gradient only the states with w_h > 0;
   the last state goes to the per-example cache (``cache: true``), which is checkpointed with the model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from jsarag.api import (
    Batch,
    Candidates,
    Context,
    Estimator,
    EstimatorOptions,
    Rescore,
    ScoreRequest,
    Scores,
    StepResult,
    hookimpl,
)
from jsarag_plugins.estimators.common import sampling_probs, weighted_sum

log = logging.getLogger("jsarag.jsa")


class JsaOptions(EstimatorOptions):
    proposals: int = Field(50, ge=1)
    """m: proposals drawn from the posterior per example and step."""
    use: Literal["all", "last"] = "all"
    """Weight all m chain states by frequency (the reference), or only the last (textbook JSA)."""
    cache: bool = True
    """Keep each example's last chain state across steps and start the next chain from it."""
    grad_pass: Literal["rescore", "single"] = "rescore"
    """rescore: score proposals without gradient, re-run only weighted states with it; single: one pass with it."""


@dataclass
class ChainRequest(ScoreRequest):
    """A score request that also carries the chain's proposals and start (candidate slots)."""

    proposals: torch.Tensor = None  # (B, m) long: slots drawn from q̃
    start: torch.Tensor = None  # (B,) long: slot of the cached state, -1 where none


def run_chain(log_ratio: torch.Tensor, proposals: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Run B independence-sampler chains; return the (B, m) visited slots and the number of accepted moves.

    ``log_ratio`` (B, C) is log[p̃(h) p(y|h) / q̃(h)], the target over the proposal; an example with ``start`` -1
    takes its first proposal as its first state, as in the reference implementation.
    """
    batch, m = proposals.shape
    rows = torch.arange(batch)
    fresh = start < 0
    current = torch.where(fresh, proposals[:, 0], start)
    states, accepted = [], 0
    for j in range(m):
        candidate = proposals[:, j]
        accept = torch.rand(batch).log() < log_ratio[rows, candidate] - log_ratio[rows, current]
        if j == 0:
            accept = accept & ~fresh  # a fresh chain's first state is its first proposal, not a move
        accepted += int(accept.sum())
        current = torch.where(accept, candidate, current)
        states.append(current)
    return torch.stack(states, dim=1), accepted


def chain_weights(states: torch.Tensor, width: int, use: str) -> torch.Tensor:
    """(B, C) share of the chain states in each slot (``all``), or a one-hot of the last state (``last``)."""
    chosen = states if use == "all" else states[:, -1:]
    counts = torch.zeros(states.shape[0], width).scatter_add_(1, chosen, torch.ones_like(chosen, dtype=torch.float))
    return counts / chosen.shape[1]


def gold_share(batch: Batch, candidates: Candidates, weights: torch.Tensor, kb) -> float:
    """Mean chain weight on the examples' gold passages: a monitor only (gold ids never steer training)."""
    gold = [{kb.row(g) for g in ex.gold_passage_ids if kb.has(g)} for ex in batch.examples]
    hits = torch.tensor([[row in gold[i] for row in rows] for i, rows in enumerate(candidates.rows.tolist())])
    return float((weights * hits).sum(-1).mean())


class Jsa(Estimator):
    """JSA-RAG: MIS over the candidate set with the posterior as proposal; trains generator, prior and posterior."""

    Options = JsaOptions
    needs_posterior = True
    adds_rows = True
    objective = ("the exact gradients (marginal likelihood, inclusive KL) over its candidate set, by a finite MIS "
                 "chain: bias only from candidates outside that set and from the chain's start, shrinking with m")

    def __init__(self, options: JsaOptions, ctx: Context | None) -> None:
        super().__init__(options, ctx)
        self.cache: dict[int, int] = {}  # example position in the train split -> KB row of its last chain state
        log.info("jsa: m=%d, use=%s, cache=%s, generator likelihood=%s (%s)", options.proposals, options.use,
                 options.cache, options.likelihood, "summed over tokens" if options.likelihood == "sum" else "per token")

    def extra_rows(self, batch: Batch) -> list[list[int]]:
        return [[self.cache[p]] if self.options.cache and p in self.cache else [] for p in batch.positions]

    def sample(self, batch: Batch, candidates: Candidates) -> ChainRequest:
        q = sampling_probs(candidates.posterior_log_probs().detach().cpu(), candidates.mask)  # (B, C)
        proposals = torch.multinomial(q, self.options.proposals, replacement=True)  # (B, m)
        start = self._cached_slots(batch, candidates)  # (B,)
        used = torch.zeros(q.shape, dtype=torch.bool).scatter_(1, proposals, True)
        has_start = start >= 0
        used[has_start.nonzero(as_tuple=True)[0], start[has_start]] = True
        single = self.options.grad_pass == "single"
        request = ScoreRequest.where(used, grad=single, keep=not single)  # rescore: the weighted states follow
        return ChainRequest(request.example, request.slot, request.grad, request.keep, proposals=proposals,
                            start=start)

    def _cached_slots(self, batch: Batch, candidates: Candidates) -> torch.Tensor:
        """(B,) the candidate slot holding each example's cached state, -1 where there is none."""
        start = torch.full((len(batch),), -1, dtype=torch.long)
        for i, position in enumerate(batch.positions):
            if self.options.cache and position in self.cache:
                hit = (candidates.rows[i] == self.cache[position]).nonzero()
                start[i] = int(hit[0, 0]) if len(hit) else -1
        return start

    def update(self, batch: Batch, candidates: Candidates, request: ChainRequest, scores: Scores,
               rescore: Rescore) -> StepResult:
        loglik = scores.matrix(request, candidates, self.options.likelihood).cpu()  # (B, C)
        log_p = candidates.prior_log_probs()  # (B, C) log p̃(h|x), with gradient
        log_q = candidates.posterior_log_probs()  # (B, C) log q̃(h|x,y), with gradient
        log_ratio = log_p.detach().cpu() + loglik.detach() - log_q.detach().cpu()  # (B, C)
        states, accepted = run_chain(log_ratio, request.proposals, request.start)  # (B, m)
        weights = chain_weights(states, loglik.shape[1], self.options.use)  # (B, C)
        if not request.grad:  # second pass: gradient only where the chain put weight
            again = ScoreRequest.where(weights > 0)
            loglik = rescore(again).matrix(again, candidates, self.options.likelihood)
        weights = weights.to(log_p.device)
        terms = {"generator_nll": -loglik.to(log_p.device), "prior_nll": -log_p, "posterior_nll": -log_q}  # (B, C)
        loss_terms = terms["generator_nll"] + terms["prior_nll"] + terms["posterior_nll"]  # (B, C)
        per_example = weighted_sum(weights, loss_terms)  # (B,)
        self._remember(batch, candidates, states[:, -1], torch.isfinite(per_example.detach()).cpu())
        stats = self._stats(batch, request, states, accepted, weights)
        stats.update({name: float(weighted_sum(weights, term.detach()).mean()) for name, term in terms.items()})
        if self.ctx is not None:
            stats["chain_gold"] = gold_share(batch, candidates, weights.cpu(), self.ctx.kb)
        return StepResult(loss=per_example.mean(), stats=stats)

    def _remember(self, batch: Batch, candidates: Candidates, last: torch.Tensor, finite: torch.Tensor) -> None:
        """Write each example's last state to the cache, on every rank (an example may go to any rank next time);
        an example whose loss is not finite keeps its old state (the loop skips such a micro-batch)."""
        if not self.options.cache:
            return
        rows = candidates.rows.gather(1, last.unsqueeze(1).to(candidates.rows.device)).squeeze(1).tolist()
        updates = [(p, r) for p, r, ok in zip(batch.positions, rows, finite.tolist()) if ok]
        if self.ctx is not None and self.ctx.world_size > 1:
            updates = [u for part in self.ctx.all_gather(updates) for u in part]
        self.cache.update(updates)

    def _stats(self, batch, request: ChainRequest, states, accepted: int, weights) -> dict[str, float]:
        moves = states.numel() - int((request.start < 0).sum())
        unique = [len(set(row)) for row in states.tolist()]
        return {
            "acceptance": accepted / max(moves, 1),
            "unique_states": sum(unique) / len(unique),
            "ess": float((1.0 / (weights**2).sum(-1)).mean()),
            "cache_hit": float((request.start >= 0).float().mean()),
            "pairs_scored": float(len(request)),
        }

    def state_dict(self) -> dict:
        positions = sorted(self.cache)
        return {"positions": torch.tensor(positions, dtype=torch.long),
                "rows": torch.tensor([self.cache[p] for p in positions], dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.cache = dict(zip(state["positions"].tolist(), state["rows"].tolist()))


@hookimpl
def register_estimators(register) -> None:
    register("jsa", Jsa)
