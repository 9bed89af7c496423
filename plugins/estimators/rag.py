"""Estimator ``rag``: RAG-Sequence top-K marginalisation (vanilla RAG).

``loss = -log Σ_{h∈C} p̃(h|x) p(y|x,h)`` over the prior's top-K candidates C. Biased: passages outside C are
ignored. The gradient flows into the generator through p(y|x,h) and into the prior through p̃(h|x).
"""
from __future__ import annotations

import torch

from jsarag.api import (
    Batch,
    Candidates,
    Estimator,
    EstimatorOptions,
    Rescore,
    ScoreRequest,
    Scores,
    StepResult,
    hookimpl,
)


class RagOptions(EstimatorOptions):
    """RAG-Sequence takes only the likelihood choice."""


class Rag(Estimator):
    """Marginalise the answer likelihood over the prior's top-K passages."""

    Options = RagOptions
    objective = ("the top-K marginal -log Σ_{h∈top-K} p̃(h|x) p(y|x,h), another objective than -log p(y|x): bias "
                 "against the exact gradient is by design (passages outside the top-K are ignored)")

    def sample(self, batch: Batch, candidates: Candidates) -> ScoreRequest:
        return ScoreRequest.all_slots(candidates)

    def update(self, batch: Batch, candidates: Candidates, request: ScoreRequest, scores: Scores,
               rescore: Rescore) -> StepResult:
        loglik = scores.matrix(request, candidates, self.options.likelihood)  # (B, C)
        prior = candidates.prior_log_probs().to(loglik.device)  # (B, C)
        marginal = torch.logsumexp(prior + loglik, dim=-1)  # (B,) log p(y|x) over C
        posterior = torch.softmax((prior + loglik).detach(), dim=-1)  # (B, C) p(h|x,y) within C
        loss = -marginal.mean()
        stats = {"marginal_nll": loss.item(), "posterior_top_share": posterior.max(-1).values.mean().item()}
        return StepResult(loss=loss, stats=stats)


@hookimpl
def register_estimators(register) -> None:
    register("rag", Rag)
