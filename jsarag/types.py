"""The values that travel through one training step: retrieve -> sample -> score -> update.

Shapes: B examples in a batch, C candidate slots per example, N scored (example, candidate) pairs,
T answer tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from jsarag.data import Example

Likelihood = Literal["sum", "mean"]


@dataclass
class Batch:
    """A micro-batch of examples and their stable positions in the split (keys for per-example state)."""

    examples: list[Example]
    positions: list[int]
    extra_rows: list[list[int]] = field(default_factory=list)  # per example: KB rows the candidates must include

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class Candidates:
    """Each example's candidate passages with the retrievers' logits over them."""

    rows: torch.Tensor  # (B, C) long: KB rows, -1 marks an empty slot
    prior_logits: torch.Tensor  # (B, C) e_q(x)·e_p(h)/τ, carries grad into the prior; -inf on empty slots
    posterior_logits: torch.Tensor | None = None  # (B, C) e_r(x,y)·e_p(h)/τ for q(h|x,y), or None

    @property
    def mask(self) -> torch.Tensor:
        """(B, C) bool: which slots hold a passage."""
        return self.rows >= 0

    def prior_log_probs(self) -> torch.Tensor:
        """(B, C) log p̃(h|x): the prior renormalised over the candidate set."""
        return torch.log_softmax(self.prior_logits.float(), dim=-1)  # float32: bf16 logits of ~1/τ lose ~0.06 nats

    def posterior_log_probs(self) -> torch.Tensor:
        """(B, C) log q̃(h|x,y): the posterior renormalised over the candidate set."""
        if self.posterior_logits is None:
            raise ValueError("these candidates carry no posterior logits")
        return torch.log_softmax(self.posterior_logits.float(), dim=-1)


@dataclass
class ScoreRequest:
    """Which (example, candidate slot) pairs the generator must score, and whether with gradient."""

    example: torch.Tensor  # (N,) long: batch row of each pair
    slot: torch.Tensor  # (N,) long: candidate column of each pair
    grad: bool = True

    def __len__(self) -> int:
        return int(self.example.numel())

    @classmethod
    def all_slots(cls, candidates: Candidates, grad: bool = True) -> ScoreRequest:
        """Request every filled slot of every example."""
        example, slot = candidates.mask.nonzero(as_tuple=True)
        return cls(example=example, slot=slot, grad=grad)


@dataclass
class Scores:
    """The generator's log-likelihood of each requested answer."""

    token_logprobs: torch.Tensor  # (N, T) log p(y_t | x, h, y_<t), 0 on padding
    token_mask: torch.Tensor  # (N, T) bool: which positions are answer tokens

    @property
    def n_tokens(self) -> torch.Tensor:
        """(N,) answer length in tokens."""
        return self.token_mask.sum(-1)

    def loglik(self, likelihood: Likelihood = "sum") -> torch.Tensor:
        """(N,) log p(y|x,h), summed over tokens or length-normalised ('mean')."""
        total = self.token_logprobs.sum(-1)
        return total if likelihood == "sum" else total / self.n_tokens.clamp(min=1)


@dataclass
class StepResult:
    """An estimator's answer for one micro-batch: the loss to minimise and what to log."""

    loss: torch.Tensor  # () scalar
    stats: dict[str, float] = field(default_factory=dict)
