"""Estimator ``supervised``: train on each example's gold passage, no latent variable (the cost floor of a step).

``loss = -log p(y|x,h*) - λ log p̃(h*|x)`` with h* the example's first gold passage, added to the candidates through
``extra_rows`` so that the prior is renormalised over its top-k plus h*. It reads ``gold_passage_ids``, which
the latent-variable estimators never do: use it as an upper-bound baseline or as the floor of ``jsarag bench
step-cost`` (one generator pass per example). Examples without a gold passage contribute nothing.
"""
from __future__ import annotations

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


class SupervisedOptions(EstimatorOptions):
    retriever_weight: float = Field(1.0, ge=0)
    """λ: weight of the prior's -log p̃(h*|x) (0 trains the generator only)."""


class Supervised(Estimator):
    """Maximise p(y|x,h*) and p̃(h*|x) for the gold passage h*."""

    Options = SupervisedOptions
    adds_rows = True
    objective = "the gold passage's -log p(y|x,h*) - λ log p̃(h*|x): supervised retrieval, no latent variable"

    def gold_rows(self, batch: Batch) -> list[int]:
        """Each example's first gold passage as a KB row, -1 where it has none."""
        kb = self.ctx.kb
        return [kb.row(ex.gold_passage_ids[0]) if ex.gold_passage_ids else -1 for ex in batch.examples]

    def extra_rows(self, batch: Batch) -> list[list[int]]:
        return [[row] if row >= 0 else [] for row in self.gold_rows(batch)]

    def sample(self, batch: Batch, candidates: Candidates) -> ScoreRequest:
        gold = torch.tensor(self.gold_rows(batch)).unsqueeze(1)  # (B, 1)
        return ScoreRequest.where((candidates.rows == gold) & (gold >= 0))  # one slot per example with gold

    def update(self, batch: Batch, candidates: Candidates, request: ScoreRequest, scores: Scores,
               rescore: Rescore) -> StepResult:
        loglik = scores.matrix(request, candidates, self.options.likelihood)  # (B, C), -inf off gold
        is_gold = torch.zeros_like(loglik, dtype=torch.bool).index_put(
            (request.example.to(loglik.device), request.slot.to(loglik.device)), torch.tensor(True))  # (B, C)
        log_p = candidates.prior_log_probs().to(loglik.device)  # (B, C)
        terms = torch.where(is_gold, loglik + self.options.retriever_weight * log_p, torch.zeros_like(loglik))
        has_gold = is_gold.any(-1)  # (B,)
        loss = -terms.sum(-1).sum() / has_gold.sum().clamp(min=1)
        nll = -torch.where(is_gold, loglik, torch.zeros_like(loglik)).sum() / has_gold.sum().clamp(min=1)
        return StepResult(loss=loss, stats={"gold_nll": float(nll.detach()), "with_gold": float(has_gold.float().mean())})


@hookimpl
def register_estimators(register) -> None:
    register("supervised", Supervised)
