"""Evaluation: the prior ranks passages (Recall@k, MRR@k against gold ids), the generator decodes answers
(EM, F1, ...). Examples are split across ranks in equal shares (padded by repetition, so that every rank makes
the same collective calls under ZeRO-3) and the results gathered."""
from __future__ import annotations

from typing import Any

import torch

from jsarag.metrics import generation_metrics, retrieval_metrics
from jsarag.types import Batch


def evaluate(run: Any, split: str) -> dict[str, float]:
    """Evaluate the run's models on (the first ``eval.max_examples`` of) a split; same result on every rank."""
    examples = run.eval_sets[split]
    limit = run.recipe.eval.max_examples
    n = min(len(examples), limit) if limit else len(examples)
    mine = _shard(n, run.ctx.rank, run.ctx.world_size)
    rows = []
    training = run.engine is not None and run.engine.training
    if training:
        run.engine.eval()
    with torch.no_grad():
        for start in range(0, len(mine), run.recipe.eval.batch_size):
            positions = mine[start : start + run.recipe.eval.batch_size]
            rows.extend(_evaluate_batch(run, Batch([examples[p] for p in positions], positions)))
    if training:
        run.engine.train()
    results = {pos: row for pos, row in _gather(rows, run.ctx.world_size)}  # repeats collapse
    ordered = [results[p] for p in range(n)]
    metrics = retrieval_metrics([r["ranked"] for r in ordered], [list(examples[p].gold_passage_ids) for p in range(n)])
    if run.recipe.eval.generate:
        metrics.update(generation_metrics([r["answer"] for r in ordered], [list(examples[p].answers) for p in range(n)]))
    return metrics


def _evaluate_batch(run: Any, batch: Batch) -> list[tuple[int, dict[str, Any]]]:
    candidates = run.call("retrieve", batch=batch, train=False)
    answers = run.call("generate", batch=batch, candidates=candidates) if run.recipe.eval.generate else None
    kb_ids = run.ctx.kb.ids
    out = []
    for i, pos in enumerate(batch.positions):
        ranked = [kb_ids[r] for r in candidates.rows[i].tolist() if r >= 0]
        out.append((pos, {"ranked": ranked, "answer": answers[i] if answers else ""}))
    return out


def _shard(n: int, rank: int, world: int) -> list[int]:
    """Positions this rank evaluates: every world-th, padded so that all ranks have the same count."""
    mine = list(range(rank, n, world))
    share = -(-n // world)
    return mine + [mine[-1] if mine else 0] * (share - len(mine))


def _gather(rows: list, world: int) -> list:
    if world == 1:
        return rows
    gathered: list[list] = [None] * world
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]
