"""Estimator ``vrag``: variational RAG (Mishra et al. 2022), the ELBO with the posterior retriever as q.

Two forms, chosen by ``samples``:
- ``samples: 0``, **exact top-K ELBO**: ``loss = -Σ_{h∈C_q} q̃(h) log p(y|x,h) + β·KL(q̃ ‖ p̃)`` over the posterior's
  top-K set C_q (``kl_over: posterior``) or with the KL over the whole candidate union (``kl_over: union``);
- ``samples: n``, **Monte-Carlo ELBO**: n passages drawn from q̃, the generator trained on their mean likelihood and
  the posterior by the score-function gradient with a leave-one-out baseline (the high-variance estimator).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

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
from jsarag_plugins.estimators.common import masked_log_softmax, sampling_probs, weighted_sum


class VragOptions(EstimatorOptions):
    top_k: int | None = Field(None, ge=1)
    """K: the posterior's top-K candidates form C_q (null: candidates.posterior_top_k, the posterior's own share)."""
    beta: float = Field(1.0, ge=0)
    """β: weight of the KL term."""
    kl_over: Literal["posterior", "union"] = "posterior"
    """KL(q̃ ‖ p̃) over C_q, or over the union of prior and posterior candidates."""
    samples: int = Field(0, ge=0)
    """0: exact ELBO over C_q; n > 0: Monte-Carlo ELBO with n samples and a score-function gradient."""


@dataclass
class DrawRequest(ScoreRequest):
    """A score request that also carries the Monte-Carlo form's draws (candidate slots)."""

    draws: torch.Tensor = None  # (B, n) long: slots drawn from q̃ over C_q


class Vrag(Estimator):
    """Maximise the ELBO E_q̃[log p(y|x,h)] - β KL(q̃ ‖ p̃) with the posterior retriever as q."""

    Options = VragOptions
    needs_posterior = True
    objective = ("the ELBO over the posterior's top-K (a lower bound; q follows the exclusive KL), another "
                 "objective than -log p(y|x): bias against the exact gradient is by design")

    def posterior_set(self, candidates: Candidates) -> torch.Tensor:
        """(B, C) bool: the posterior's top-K slots (C_q)."""
        logits = candidates.posterior_logits.detach()
        k = min(self.options.top_k or self.ctx.recipe["candidates"]["posterior_top_k"], logits.shape[1])
        top = logits.topk(k, dim=-1).indices
        return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True) & candidates.mask.to(logits.device)

    def sample(self, batch: Batch, candidates: Candidates) -> ScoreRequest:
        in_set = self.posterior_set(candidates).cpu()
        if self.options.samples == 0:
            return ScoreRequest.where(in_set)
        q = sampling_probs(masked_log_softmax(candidates.posterior_logits.detach().cpu(), in_set), in_set)  # (B, C)
        draws = torch.multinomial(q, self.options.samples, replacement=True)  # (B, n) slots
        request = ScoreRequest.where(torch.zeros_like(in_set).scatter_(1, draws, True))
        return DrawRequest(request.example, request.slot, request.grad, draws=draws)

    def update(self, batch: Batch, candidates: Candidates, request: ScoreRequest, scores: Scores,
               rescore: Rescore) -> StepResult:
        in_set = self.posterior_set(candidates)
        loglik = scores.matrix(request, candidates, self.options.likelihood)  # (B, C)
        in_set = in_set.to(loglik.device)
        log_q = masked_log_softmax(candidates.posterior_logits, in_set).to(loglik.device)  # (B, C) over C_q
        kl = self.kl(candidates, in_set).to(loglik.device)  # (B,)
        if self.options.samples == 0:
            expected = weighted_sum(log_q.exp(), loglik)  # (B,) E_q̃[log p(y|x,h)]
            loss = (-expected + self.options.beta * kl).mean()
        else:
            expected, surrogate = self._monte_carlo(loglik, log_q, request.draws)
            loss = (-surrogate + self.options.beta * kl).mean()
        elbo = (expected - kl).detach()
        return StepResult(loss=loss, stats={"elbo": float(elbo.mean()), "kl": float(kl.detach().mean())})

    def kl(self, candidates: Candidates, in_set: torch.Tensor) -> torch.Tensor:
        """(B,) KL(q̃ ‖ p̃): q̃ is the same posterior over C_q as in the expectation (zero outside it); p̃ is the prior
        renormalised over C_q (``kl_over: posterior``) or over the whole candidate union (``union``)."""
        keep = in_set if self.options.kl_over == "posterior" else candidates.mask.to(in_set.device)
        log_q = masked_log_softmax(candidates.posterior_logits, in_set)  # (B, C), -inf outside C_q
        log_p = masked_log_softmax(candidates.prior_logits, keep)  # (B, C)
        return weighted_sum(log_q.exp(), log_q - log_p)

    def _monte_carlo(self, loglik: torch.Tensor, log_q: torch.Tensor, draws: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) the sample mean of log p(y|x,h) and the surrogate whose gradient is the score-function estimate."""
        draws = draws.to(loglik.device)  # (B, n)
        ll = loglik.gather(1, draws)  # (B, n)
        lq = log_q.gather(1, draws)  # (B, n)
        n = ll.shape[1]
        baseline = (ll.sum(1, keepdim=True) - ll) / max(n - 1, 1) if n > 1 else torch.zeros_like(ll)
        surrogate = ll.mean(1) + ((ll - baseline).detach() * lq).mean(1)
        return ll.mean(1), surrogate


@hookimpl
def register_estimators(register) -> None:
    register("vrag", Vrag)
