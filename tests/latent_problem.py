"""A latent-passage problem small enough to solve exactly, for the estimator tests.

B examples share one KB of 8 passages; each example's candidate set holds all 8 plus 2 empty slots (row -1, logits
-inf), as the framework pads. Even examples have 3-token answers, odd ones 2-token answers (right-aligned, padding
masked), so ``likelihood: sum`` and ``mean`` give different posteriors. The three modules' outputs are leaves with
gradient: the generator's token log-probabilities (B, C, T), the prior's logits (B, C) and the posterior's (B, C).
An estimator's gradient with respect to each module's parameters is its gradient with respect to these outputs times
the module's Jacobian, so matching these gradients is matching every module's gradient.

``Problem.scores`` answers a score request like a real generator: a request without gradient (``grad=False``, jsa's
first pass) gets values detached from the leaves, so a gradient can only come from a pass that asked for one.

The closed forms below (``*_gradients``) are each estimator's exact per-example gradient, written from the formulas
in the estimators' docstrings, independently of the estimators' code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from jsarag.api import Batch, Candidates, ScoreRequest, Scores

K, SLOTS, T = 8, 10, 3  # passages, candidate slots (the last two empty), answer tokens at most
PRIOR = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.07, 0.05, 0.03])  # p̃(h|x)
PROPOSAL = torch.tensor([0.10, 0.20, 0.05, 0.25, 0.05, 0.15, 0.15, 0.05])  # q̃(h|x,y), deliberately imperfect
LIKELIHOOD = torch.tensor([0.01, 0.30, 0.05, 0.60, 0.02, 0.20, 0.40, 0.10])  # p(y|x,h) of a 3-token answer
TOKENS = torch.stack([LIKELIHOOD.log() * share for share in (0.5, 0.3, 0.2)], dim=-1)  # (K, T) per-token log-probs
LENGTHS = (3, 2)  # answer tokens of even and of odd examples


def pad(values: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
    """(..., K) -> (..., SLOTS): the two empty slots filled with ``fill``."""
    return torch.cat([values, torch.full((*values.shape[:-1], SLOTS - K), fill)], dim=-1)


@dataclass
class Exact:
    """A group's (even or odd examples') exact quantities over the 8 passages."""

    loglik: torch.Tensor  # (K,) log p(y|x,h) by the likelihood rule
    posterior: torch.Tensor  # (K,) π = p(h|x,y)
    dloglik_dtokens: torch.Tensor  # (T,) d log p(y|x,h) / d token log-prob (mask / n for mean)


def exact(group: int, likelihood: str = "sum") -> Exact:
    """Exact log-likelihoods and posterior of group 0 (3-token answers) or 1 (2-token answers)."""
    n = LENGTHS[group]
    mask = (torch.arange(T) >= T - n).float()  # (T,) right-aligned answer positions
    loglik = (TOKENS * mask).sum(-1)
    scale = 1.0 / n if likelihood == "mean" else 1.0
    loglik = loglik * scale
    return Exact(loglik, torch.softmax(PRIOR.log() + loglik, -1), mask * scale)


class Problem:
    """B examples over the 8-passage KB, each with its own leaves (copies of the same values)."""

    def __init__(self, batch: int, proposal: torch.Tensor = PROPOSAL, tokens: torch.Tensor = TOKENS) -> None:
        self.size = batch
        self.batch = Batch(examples=[None] * batch, positions=list(range(batch)))
        self.prior_logits = pad(PRIOR.log()).repeat(batch, 1).requires_grad_()  # (B, C)
        self.posterior_logits = pad(proposal.log()).repeat(batch, 1).requires_grad_()  # (B, C)
        rows = pad(torch.arange(K).float(), fill=-1).long()
        self.candidates = Candidates(rows=rows.repeat(batch, 1), prior_logits=self.prior_logits,
                                     posterior_logits=self.posterior_logits)
        lengths = torch.tensor([LENGTHS[e % 2] for e in range(batch)])
        self.token_mask = torch.arange(T) >= T - lengths.unsqueeze(1)  # (B, T) right-aligned
        filled = torch.cat([tokens, torch.zeros(SLOTS - K, T)])  # (C, T): an empty slot would score 0
        self.tokens = filled.repeat(batch, 1, 1).requires_grad_()  # (B, C, T)
        self.requests: list[ScoreRequest] = []

    def scores(self, request: ScoreRequest) -> Scores:
        """Score the requested pairs; detached from the leaves unless the request asks for gradient."""
        self.requests.append(request)
        mask = self.token_mask[request.example]  # (N, T)
        values = self.tokens[request.example, request.slot].masked_fill(~mask, 0.0)  # (N, T)
        return Scores(token_logprobs=values if request.grad else values.detach(), token_mask=mask)

    def step(self, estimator):
        """sample -> score -> update, as the loop calls them; the result's loss."""
        request = estimator.sample(self.batch, self.candidates)
        return estimator.update(self.batch, self.candidates, request, self.scores(request), rescore=self.scores)

    def per_example(self) -> dict[str, torch.Tensor]:
        """Each leaf's gradient per example (the loss is a mean over B), averaged over the even and the odd
        examples: (2, C) for prior and posterior, (2, C, T) for the generator's token log-probs; zeros if none."""
        grads = {}
        for name, leaf in (("prior", self.prior_logits), ("posterior", self.posterior_logits),
                           ("generator", self.tokens)):
            g = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad * self.size
            grads[name] = torch.stack([g[0::2].mean(0), g[1::2].mean(0)])
        return grads

    def zero_grad(self) -> None:
        for leaf in (self.prior_logits, self.posterior_logits, self.tokens):
            leaf.grad = None


def expected(prior: torch.Tensor, posterior: torch.Tensor, generator: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-group gradients given as (2, K), (2, K), (2, K, T): padded to the problem's slots."""
    return {"prior": pad(prior, 0.0), "posterior": pad(posterior, 0.0),
            "generator": torch.cat([generator, torch.zeros(2, SLOTS - K, T)], dim=1)}


def marginal_gradients(likelihood: str, proposal: torch.Tensor = PROPOSAL, posterior_trained: bool = True
                       ) -> dict[str, torch.Tensor]:
    """The exact gradients of -log Σ_h p̃(h) p(y|h) (+ the inclusive KL(π ‖ q̃) for the posterior): prior p̃ - π,
    posterior q̃ - π, generator -π_h d log p(y|h) / d tokens. JSA's expectation and exact's value."""
    groups = [exact(g, likelihood) for g in (0, 1)]
    pi = torch.stack([e.posterior for e in groups])  # (2, K)
    generator = torch.stack([-e.posterior.unsqueeze(-1) * e.dloglik_dtokens for e in groups])  # (2, K, T)
    posterior = proposal - pi if posterior_trained else torch.zeros(2, K)
    return expected(PRIOR - pi, posterior, generator)


def elbo_gradients(likelihood: str, top_k: int, beta: float, kl_over: str) -> dict[str, torch.Tensor]:
    """The exact gradients of -ELBO = -Σ_{h∈C_q} q̃ log p(y|h) + β KL(q̃ ‖ p̃), q̃ the posterior over its top-k C_q,
    p̃ the prior over C_q (``posterior``) or over every candidate (``union``):
    generator -q̃_h d log p(y|h)/d tokens; prior -β (q̃ - p̃) on p̃'s support;
    posterior -q̃_j (g_j - E_q̃ g) with g = log p(y|h) - β log q̃ + β log p̃ (softmax over C_q)."""
    in_set = torch.zeros(K, dtype=torch.bool)
    in_set[PROPOSAL.topk(top_k).indices] = True
    q = torch.where(in_set, PROPOSAL, torch.zeros(K))
    q = q / q.sum()
    support = in_set if kl_over == "posterior" else torch.ones(K, dtype=torch.bool)
    p = torch.where(support, PRIOR, torch.zeros(K))
    p = p / p.sum()
    prior, posterior, generator = [], [], []
    for group in (0, 1):
        e = exact(group, likelihood)
        g = torch.where(in_set, e.loglik - beta * q.clamp_min(1e-30).log() + beta * p.clamp_min(1e-30).log(),
                        torch.zeros(K))
        posterior.append(-q * (g - (q * g).sum()))
        prior.append(torch.where(support, -beta * (q - p), torch.zeros(K)))
        generator.append(-q.unsqueeze(-1) * e.dloglik_dtokens)
    return expected(torch.stack(prior), torch.stack(posterior), torch.stack(generator))


def token_marginal_gradients() -> dict[str, torch.Tensor]:
    """The exact gradients of RAG-Token's -Σ_t log Σ_h p̃(h) p(y_t|h): generator -r_{h,t}, prior Σ_t (p̃ - r_{·,t}),
    with r_{h,t} = p̃(h) p(y_t|h) / Σ_h' p̃(h') p(y_t|h') on answer positions."""
    prior, generator = [], []
    for group in (0, 1):
        mask = (torch.arange(T) >= T - LENGTHS[group]).float()  # (T,)
        r = torch.softmax(PRIOR.log().unsqueeze(-1) + TOKENS, dim=0) * mask  # (K, T)
        generator.append(-r)
        prior.append((PRIOR.unsqueeze(-1) * mask - r).sum(-1))
    return expected(torch.stack(prior), torch.zeros(2, K), torch.stack(generator))


def max_error(measured: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], group: str) -> float:
    """The largest absolute difference between a measured and a reference gradient of one module."""
    return float((measured[group] - reference[group]).abs().max())
