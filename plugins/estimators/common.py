"""Small tensor helpers shared by the built-in estimators (a third-party estimator may import them too)."""
from __future__ import annotations

import torch


def masked_log_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, C) log-softmax over the slots where ``keep`` is true, -inf elsewhere."""
    return torch.log_softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


def weighted_sum(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B,) Σ_c w_c v_c, where zero weights silence infinite values (in the forward and the backward pass)."""
    safe = torch.where(weights > 0, values, torch.zeros_like(values))
    return (weights * safe).sum(-1)


def sampling_probs(log_probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, C) probabilities to draw from; a row that is not finite (a diverged model) becomes uniform over ``keep``.

    Such a row's loss is not finite either, so the loop skips the micro-batch on every rank; drawing must not fail
    on one rank first, or the others would wait for it in a collective.
    """
    probs = log_probs.exp()  # (B, C)
    broken = ~torch.isfinite(probs).all(-1) | (probs.sum(-1) <= 0)  # (B,)
    uniform = keep.to(probs.dtype) / keep.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(broken.unsqueeze(-1), uniform, probs)
