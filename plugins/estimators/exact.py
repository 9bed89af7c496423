"""Estimator ``exact``: the full marginal likelihood over the whole KB, and the inclusive KL for the posterior.

``loss = -log Σ_{h∈K} p(h|x) p(y|x,h) + KL(p(h|x,y) ‖ q(h|x,y))`` with the true posterior held fixed in the KL.
It scores every passage for every example: the ground truth the other estimators approximate, for small KBs,
tests and gradient studies. Needs ``candidates.mode: all``.
"""
from __future__ import annotations

import torch
from pydantic import Field

from jsarag.api import (
    Batch,
    Candidates,
    Context,
    Estimator,
    EstimatorOptions,
    RecipeError,
    Rescore,
    ScoreRequest,
    Scores,
    StepResult,
    hookimpl,
)
from jsarag_plugins.estimators.common import weighted_sum


class ExactOptions(EstimatorOptions):
    max_passages: int = Field(256, ge=1)
    """Refuse KBs larger than this (every passage is scored for every example)."""


class Exact(Estimator):
    """Exact marginal likelihood over all of K; exact inclusive KL for the posterior."""

    Options = ExactOptions
    needs_posterior = True
    needs_all_candidates = True
    objective = "the reference: -log p(y|x) over all of K, inclusive KL(p(h|x,y) ‖ q) for the posterior"

    def __init__(self, options: ExactOptions, ctx: Context | None) -> None:
        super().__init__(options, ctx)
        if ctx is not None and len(ctx.kb) > options.max_passages:
            raise RecipeError(
                f"estimator exact scores every passage: the KB has {len(ctx.kb)} > estimator.max_passages="
                f"{options.max_passages}; use a smaller KB or raise the bound"
            )

    def sample(self, batch: Batch, candidates: Candidates) -> ScoreRequest:
        return ScoreRequest.all_slots(candidates)

    def update(self, batch: Batch, candidates: Candidates, request: ScoreRequest, scores: Scores,
               rescore: Rescore) -> StepResult:
        loglik = scores.matrix(request, candidates, self.options.likelihood)  # (B, K)
        log_p = candidates.prior_log_probs().to(loglik.device)  # (B, K)
        joint = log_p + loglik
        marginal = torch.logsumexp(joint, dim=-1)  # (B,) log p(y|x)
        posterior = torch.softmax(joint.detach(), dim=-1)  # (B, K) p(h|x,y)
        log_q = candidates.posterior_log_probs().to(loglik.device)
        kl = weighted_sum(posterior, posterior.clamp_min(1e-30).log() - log_q)  # (B,) KL(p(h|x,y) ‖ q)
        loss = (-marginal + kl).mean()
        return StepResult(loss=loss, stats={"marginal_nll": -marginal.mean().item(), "kl_inclusive": kl.mean().item()})


@hookimpl
def register_estimators(register) -> None:
    register("exact", Exact)
