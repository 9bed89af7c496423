"""What the sharded indexes share: each rank's contiguous share of the KB's rows, and the exact merge of the ranks'
top-k by all-gather (ties to the lower KB row, so the answer does not depend on the number of ranks)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

LocalSearch = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (N, d) queries -> (N, k) each


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank's contiguous share of n rows (ceil(n / world) each, the last ranks may get fewer)."""
    share = -(-n // world)
    lo = min(n, rank * share)
    return lo, min(n, lo + share)


def sharded_search(queries: torch.Tensor, k: int, local: LocalSearch, rank: int, world: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Search every rank's (B_r, d) queries in every rank's shard and merge exactly; a collective when world > 1.

    ``local`` returns (N, k) scores and KB rows (-1 where the shard has fewer than k) within this rank's shard."""
    if world == 1:
        scores, rows = local(queries, k)
        return scores.cpu().numpy(), rows.cpu().numpy()
    everyone, sizes = all_gather_rows(queries)  # (N, d), N = sum of the ranks' B
    scores, rows = local(everyone, k)  # (N, k)
    scores, rows = best(torch.cat(all_gather(scores), 1), torch.cat(all_gather(rows), 1), k)
    start = sum(sizes[:rank])
    return scores[start : start + len(queries)].cpu().numpy(), rows[start : start + len(queries)].cpu().numpy()


def best(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) best of (N, M) candidates by score, ties broken by the lower row (empty -1 rows last)."""
    by_row = torch.where(rows < 0, torch.iinfo(torch.long).max, rows).argsort(dim=1, stable=True)
    scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), rows.gather(1, order)


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor of the same shape, in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def all_gather_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's (B_r, d) tensor in rank order, B_r may differ; return it and the B_r."""
    sizes = [int(s) for s in all_gather(torch.tensor([len(tensor)], device=tensor.device))]
    padded = torch.zeros((max(sizes), tensor.shape[1]), dtype=tensor.dtype, device=tensor.device)
    padded[: len(tensor)] = tensor
    return torch.cat([part[:size] for part, size in zip(all_gather(padded), sizes)]), sizes
