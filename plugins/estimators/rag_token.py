"""Estimator ``rag_token``: RAG-Token, top-K marginalisation per answer token.

``loss = -Σ_t log Σ_{h∈C} p̃(h|x) p(y_t|x,h,y_<t)`` over the prior's top-K candidates C.
"""
from __future__ import annotations

import torch

from jsarag.api import Batch, Candidates, Options, Rescore, ScoreRequest, Scores, StepResult, hookimpl
from jsarag_plugins.estimators.rag import Rag


class RagToken(Rag):
    """Marginalise each answer token's likelihood over the prior's top-K passages (sampling as ``rag``)."""

    Options = Options  # token log-likelihoods are marginalised as they are: no sum/mean choice
    objective = "the per-token top-K marginal, another objective: bias against the exact gradient is by design"

    def update(self, batch: Batch, candidates: Candidates, request: ScoreRequest, scores: Scores,
               rescore: Rescore) -> StepResult:
        b, c = candidates.rows.shape
        t = scores.token_logprobs.shape[1]
        device = scores.token_logprobs.device
        tokens = torch.full((b, c, t), float("-inf"), device=device)  # (B, C, T)
        tokens = tokens.index_put((request.example.to(device), request.slot.to(device)), scores.token_logprobs)
        mask = torch.zeros(b, t, dtype=torch.bool, device=device)  # (B, T): answers are right-aligned
        mask[request.example.to(device)] = scores.token_mask
        prior = candidates.prior_log_probs().to(device).unsqueeze(-1)  # (B, C, 1)
        per_token = torch.logsumexp(prior + tokens, dim=1)  # (B, T)
        loglik = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)  # (B,)
        loss = -loglik.mean()
        return StepResult(loss=loss, stats={"token_marginal_nll": float(loss.detach())})


@hookimpl
def register_estimators(register) -> None:
    register("rag_token", RagToken)
