"""Estimator ``rag``: RAG-Sequence top-K marginalisation (vanilla RAG).

``loss = -log Σ_{h∈C} p̃(h|x) p(y|x,h)`` over the prior's top-K candidates C. Biased: passages outside C are
ignored. The gradient flows into the generator through p(y|x,h) and into the prior through p̃(h|x).
"""
from __future__ import annotations

import torch

from jsarag import hookimpl
from jsarag.components import Component, Options
from jsarag.estimation import scatter_scores
from jsarag.types import Batch, Candidates, Likelihood, ScoreRequest, Scores, StepResult


class RagOptions(Options):
    likelihood: Likelihood = "sum"
    """log p(y|x,h) summed over answer tokens, or their mean (length-normalised)."""


class Rag(Component):
    """Marginalise the answer likelihood over the prior's top-K passages."""

    kind = "estimator"
    Options = RagOptions
    needs_posterior = False

    @hookimpl
    def sample(self, batch: Batch, candidates: Candidates) -> ScoreRequest:
        return ScoreRequest.all_slots(candidates)

    @hookimpl
    def update(self, batch: Batch, candidates: Candidates, request: ScoreRequest, scores: Scores) -> StepResult:
        loglik = scatter_scores(scores.loglik(self.options.likelihood), request, candidates)  # (B, C)
        prior = candidates.prior_log_probs().to(loglik.device)  # (B, C)
        marginal = torch.logsumexp(prior + loglik, dim=-1)  # (B,) log p(y|x) over C
        posterior = torch.softmax((prior + loglik).detach(), dim=-1)  # (B, C) p(h|x,y) within C
        loss = -marginal.mean()
        stats = {"marginal_nll": loss.item(), "posterior_top_share": posterior.max(-1).values.mean().item()}
        return StepResult(loss=loss, stats=stats)


@hookimpl
def register_estimators(register) -> None:
    register("rag", Rag)
