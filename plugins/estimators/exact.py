"""Estimator ``exact``: the full marginal likelihood over the whole KB, and the inclusive KL for the posterior.

``loss = -log Σ_{h∈K} p(h|x) p(y|x,h) + KL(p(h|x,y) ‖ q(h|x,y))`` with the true posterior held fixed in the KL.
It scores every passage for every example: the ground truth the other estimators approximate, for small KBs,
tests and gradient studies. Needs ``candidates.mode: all``.

It scores every pair without gradient first (a request with ``keep``), forms the loss and the true posterior π from
those values, and gives the generator the gradient of the posterior-weighted surrogate ``-Σ_h π_h log p(y|x,h)``
(the marginal's gradient, π held fixed) by re-scoring the pairs with gradient in chunks of ``grad_chunk`` pairs,
each under ``torch.utils.checkpoint``: the backward pass recomputes one chunk at a time, so memory no longer grows
with the KB, and ``loss.backward()`` or ``torch.autograd.grad`` see one ordinary graph (ZeRO 0-3 alike). Pairs
whose weight π_h is exactly 0 get no gradient and are not re-scored. Called with scores that carry gradient (a
request with ``grad``), ``update`` uses them as they are.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
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
    grad_chunk: int = Field(16, ge=1)
    """Pairs re-scored with gradient at once: the backward pass holds one chunk's activations at a time."""


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
        return ScoreRequest.all_slots(candidates, grad=False, keep=True)  # the gradient follows, in chunks

    def update(self, batch: Batch, candidates: Candidates, request: ScoreRequest, scores: Scores,
               rescore: Rescore) -> StepResult:
        loglik = scores.matrix(request, candidates, self.options.likelihood)  # (B, K)
        log_p = candidates.prior_log_probs().to(loglik.device)  # (B, K)
        joint = log_p + (loglik if request.grad else loglik.detach())
        marginal = torch.logsumexp(joint, dim=-1)  # (B,) log p(y|x)
        posterior = torch.softmax(joint.detach(), dim=-1)  # (B, K) p(h|x,y)
        log_q = candidates.posterior_log_probs().to(loglik.device)
        kl = weighted_sum(posterior, posterior.clamp_min(1e-30).log() - log_q)  # (B,) KL(p(h|x,y) ‖ q)
        loss = (-marginal + kl).mean()
        if not request.grad:  # the generator's part of -marginal's gradient: -Σ_h π_h ∇ log p(y|x,h), value 0
            loss = loss - self._surrogate(posterior, request, candidates, rescore).mean()
        return StepResult(loss=loss, stats={"marginal_nll": -marginal.mean().item(), "kl_inclusive": kl.mean().item()})

    def _surrogate(self, posterior: torch.Tensor, request: ScoreRequest, candidates: Candidates,
                   rescore: Rescore) -> torch.Tensor:
        """(B,) Σ_h π_h (ℓ_h - sg ℓ_h), ℓ_h = log p(y|x,h) re-scored with gradient chunk by chunk under activation
        checkpointing; zero in value, its gradient is the generator's gradient of log p(y|x) (π held fixed)."""
        weight = posterior[request.example.to(posterior.device), request.slot.to(posterior.device)]  # (N,)
        kept = (weight > 0).nonzero(as_tuple=True)[0].cpu()  # a zero weight contributes no gradient
        total = torch.zeros(posterior.shape[0], device=posterior.device)
        for start in range(0, len(kept), self.options.grad_chunk):
            part = kept[start : start + self.options.grad_chunk]
            chunk = ScoreRequest(example=request.example[part], slot=request.slot[part], grad=True)

            def score(chunk: ScoreRequest = chunk) -> tuple[torch.Tensor, torch.Tensor]:
                scores = rescore(chunk)
                return scores.token_logprobs, scores.token_mask

            # no early stop: the recomputation runs through the framework's hook point, which must see it return
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                token_logprobs, token_mask = torch.utils.checkpoint.checkpoint(score, use_reentrant=False)
            values = Scores(token_logprobs, token_mask).loglik(self.options.likelihood)  # (n,)
            terms = weight[part.to(weight.device)] * (values - values.detach()).to(weight.device)
            total = total.index_add(0, chunk.example.to(total.device), terms)
        return total


@hookimpl
def register_estimators(register) -> None:
    register("exact", Exact)
