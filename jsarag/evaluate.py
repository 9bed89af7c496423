"""Evaluation: the prior ranks passages (Recall@k, MRR@k against gold ids), the generator decodes answers
(EM, F1, ...). Examples are split across ranks in equal shares (padded by repetition, so that every rank makes
the same collective calls under ZeRO-3) and the results gathered."""
from __future__ import annotations

import json
from typing import Any, NamedTuple

import torch

from jsarag.api import Batch
from jsarag.data import Example
from jsarag.faults import fault_point
from jsarag.files import atomic_write
from jsarag.metrics import generation_metrics, retrieval_metrics
from jsarag.safety import stop_agreed

SAMPLES, SAMPLE_PASSAGES = 3, 3  # examples kept for reports, with this many of their top-ranked passages


class Evaluation(NamedTuple):
    """The metrics of a split and a few examples as the models saw them."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]]  # the first SAMPLES examples: question, answers, prediction, retrieved passages
    predictions: list[dict[str, Any]]  # every example: id, prediction, the ranked passage ids


def evaluate(run: Any, split: str) -> Evaluation:
    """Evaluate the run's models on (the first ``eval.max_examples`` of) a split; the same result on every rank."""
    examples = run.eval_sets[split]
    limit = run.recipe.eval.max_examples
    n = min(len(examples), limit) if limit else len(examples)
    mine = _shard(n, run.ctx.rank, run.ctx.world_size)
    rows = []
    training = run.engine is not None and run.engine.training
    if training:
        run.engine.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(mine), run.recipe.eval.batch_size):
                positions = mine[start : start + run.recipe.eval.batch_size]
                rows.extend(_evaluate_batch(run, Batch([examples[p] for p in positions], positions)))
                fault_point("eval")  # crash tests: a kill in the middle of an evaluation
                stop_agreed(run.ctx.world_size)  # a signal during training abandons the evaluation
    finally:
        if training:
            run.engine.train()
    results = {pos: row for pos, row in _gather(rows, run.ctx.world_size)}  # repeats collapse
    ordered = [results[p] for p in range(n)]
    metrics = retrieval_metrics([r["ranked"] for r in ordered], [list(examples[p].gold_passage_ids) for p in range(n)])
    if run.recipe.eval.generate:
        metrics.update(generation_metrics([r["answer"] for r in ordered], [list(examples[p].answers) for p in range(n)]))
    predictions = [{"id": examples[p].id, "prediction": r["answer"], "ranked": r["ranked"]} for p, r in enumerate(ordered)]
    return Evaluation(metrics, [_sample(run, examples[p], ordered[p]) for p in range(min(n, SAMPLES))], predictions)


def write_predictions(run: Any, split: str, step: int, predictions: list[dict[str, Any]]) -> None:
    """Write <output_dir>/predictions/<split>-step<N>.jsonl (rank 0)."""
    if run.ctx.rank == 0:
        lines = "".join(json.dumps(p) + "\n" for p in predictions)
        atomic_write(run.recipe.output_dir / "predictions" / f"{split}-step{step:07d}.jsonl", lines)


def _sample(run: Any, example: Example, row: dict[str, Any]) -> dict[str, Any]:
    """One example for a report: what was asked, the reference, the prediction and the top passages."""
    kb, gold = run.ctx.kb, set(example.gold_passage_ids)
    passages = [kb.passage(kb.row(pid)) for pid in row["ranked"][:SAMPLE_PASSAGES]]
    return {"id": example.id, "question": example.question, "answer": example.answer,
            "prediction": row["answer"] if run.recipe.eval.generate else None,
            "retrieved": [{"id": p.id, "title": p.title, "text": p.text, "gold": p.id in gold} for p in passages]}


def _evaluate_batch(run: Any, batch: Batch) -> list[tuple[int, dict[str, Any]]]:
    candidates = run.rank(batch, min(run.recipe.eval.top_k, len(run.ctx.kb)))
    answers = run.generate(batch, candidates) if run.recipe.eval.generate else None
    kb = run.ctx.kb
    out = []
    for i, pos in enumerate(batch.positions):
        ranked = [kb.passage(r).id for r in candidates.rows[i].tolist() if r >= 0]
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
