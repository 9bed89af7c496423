"""Answer-quality and retrieval-quality metrics; every score is computed by ``torchmetrics``.

Which torchmetrics function computes what (all results are floats in [0, 1]):

- ``em``, ``f1``: ``torchmetrics.functional.text.squad``. SQuAD normalisation (lower-case, drop punctuation,
  drop the articles a/an/the, collapse whitespace), then exact match and token-overlap F1; the best score over an
  example's references, averaged over examples. As in SQuAD 2.0, a prediction and a reference that are both empty
  after normalisation (e.g. "" and "The.") count as a match.
- ``bleu1``, ``bleu4``: torchmetrics' BLEU (``torchmetrics.functional.text.bleu``), the same numbers as
  ``bleu_score(..., n_gram=1)`` / ``n_gram=4``. Corpus-level: n-gram counts and the brevity penalty are pooled over
  all examples, each with all its references; whitespace tokens, case-sensitive, no smoothing; no sacrebleu. We run
  its counting loop (``_bleu_score_update``) once for n = 1..4 with plain Python counters, which is about 10x faster
  than the public function's per-n-gram tensor updates, then its formula (``_bleu_score_compute``) for n = 1 and 4.
- ``rougeL``: ``torchmetrics.functional.text.rouge.rouge_score`` with ``rouge_keys="rougeL"``: LCS F-measure, the
  best over an example's references (``accumulate="best"``), averaged over examples. The default rouge tokeniser
  (lower-case, every run of characters outside [a-z0-9] is a separator, so text in other scripts scores 0) and no
  stemmer, so nltk is never needed (only ``rougeLsum`` and the stemmer would want it).
- ``recall@1``, ``recall@10``: ``torchmetrics.functional.retrieval.retrieval_hit_rate`` with ``top_k``: 1 if any
  gold id is among the top k retrieved ids, else 0; averaged over queries.
- ``mrr@10``: ``torchmetrics.functional.retrieval.retrieval_reciprocal_rank`` with ``top_k=10``: 1/rank of the
  first gold id within the top 10, else 0; averaged over queries.

Empty input returns ``{}``; inputs whose lengths differ raise :class:`MetricInputError` (a ``ValueError``).
Scores come from float32 tensors, so they carry float32 precision (about 1e-7).
"""
from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

import torch
from torchmetrics.functional.retrieval import retrieval_hit_rate, retrieval_reciprocal_rank
from torchmetrics.functional.text import squad
from torchmetrics.functional.text.bleu import _bleu_score_compute, _bleu_score_update, _tokenize_fn
from torchmetrics.functional.text.rouge import rouge_score

from jsarag.errors import DataError

GENERATION_METRICS: tuple[str, ...] = ("em", "f1", "bleu1", "bleu4", "rougeL")
RETRIEVAL_METRICS: tuple[str, ...] = ("recall@1", "recall@10", "mrr@10")


class MetricInputError(DataError, ValueError):
    """Metric inputs do not fit together (lengths differ, an example has no reference, a str where a list goes)."""


def generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Score generated answers against one or more reference answers each; ``{}`` for no examples."""
    _check_same_length("predictions", predictions, "references", references)
    if not predictions:
        return {}
    preds = list(predictions)
    refs = _as_lists("references", references)
    for i, ref in enumerate(refs):
        if not ref:
            raise MetricInputError(f"references[{i}] is empty; every prediction needs at least one reference")
    return {**_squad_scores(preds, refs), **_bleu_scores(preds, refs), "rougeL": _rouge_l(preds, refs)}


def retrieval_metrics(ranked_ids: Sequence[Sequence[str]], gold_ids: Sequence[Sequence[str]]) -> dict[str, float]:
    """Score rankings (best first) against gold ids; queries without gold ids are skipped, ``{}`` if none is left."""
    _check_same_length("ranked_ids", ranked_ids, "gold_ids", gold_ids)
    rankings = _as_lists("ranked_ids", ranked_ids)
    golds = _as_lists("gold_ids", gold_ids)
    scores = [_query_scores(ranking, set(gold)) for ranking, gold in zip(rankings, golds) if gold]
    if not scores:
        return {}
    return {name: fmean(column) for name, column in zip(RETRIEVAL_METRICS, zip(*scores))}


def _check_same_length(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
    """Raise MetricInputError naming both lengths unless ``a`` and ``b`` pair up one to one."""
    if len(a) != len(b):
        raise MetricInputError(f"{name_a} has {len(a)} items but {name_b} has {len(b)}; they must be the same length")


def _as_lists(name: str, items: Sequence[Sequence[str]]) -> list[list[str]]:
    """Copy a sequence of string lists, refusing a bare str (which would be split into characters)."""
    for i, item in enumerate(items):
        if isinstance(item, str):
            raise MetricInputError(f"{name}[{i}] is the str {item!r}; pass a list of strings, e.g. [{item!r}]")
    return [list(item) for item in items]


def _squad_scores(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
    """SQuAD exact match and F1 (max over references, mean over examples) via torchmetrics."""
    ids = [str(i) for i in range(len(preds))]
    out = squad(
        [{"prediction_text": pred, "id": i} for pred, i in zip(preds, ids)],
        [{"answers": {"text": ref}, "id": i} for ref, i in zip(refs, ids)],
    )
    return {"em": out["exact_match"].item() / 100.0, "f1": out["f1"].item() / 100.0}


def _bleu_scores(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
    """Corpus-level BLEU-1 and BLEU-4 from one pass of torchmetrics' BLEU n-gram counting."""
    numerator, denominator = [0.0] * 4, [0.0] * 4  # clipped matches / candidate n-grams, for n = 1..4
    pred_len, ref_len = _bleu_score_update(  # type: ignore[arg-type]  # plain numbers where it types Tensors
        preds, refs, numerator, denominator, 0.0, 0.0, 4, _tokenize_fn
    )
    num, den, p_len, r_len = (torch.tensor(x) for x in (numerator, denominator, pred_len, ref_len))
    return {
        f"bleu{n}": _bleu_score_compute(p_len, r_len, num[:n], den[:n], n, [1.0 / n] * n, False).item() for n in (1, 4)
    }


def _rouge_l(preds: list[str], refs: list[list[str]]) -> float:
    """ROUGE-L F-measure (best over references, mean over examples) via torchmetrics."""
    return rouge_score(preds, refs, accumulate="best", rouge_keys="rougeL")["rougeL_fmeasure"].item()


def _query_scores(ranking: list[str], gold: set[str]) -> tuple[float, float, float]:
    """Recall@1, recall@10 and reciprocal rank@10 of one ranking via torchmetrics; all 0 for an empty ranking."""
    if not ranking:
        return 0.0, 0.0, 0.0
    relevant = torch.tensor([doc_id in gold for doc_id in ranking])
    scores = torch.arange(len(ranking), 0, -1, dtype=torch.float32)  # best first; positive, as MRR requires
    return (
        retrieval_hit_rate(scores, relevant, top_k=1).item(),
        retrieval_hit_rate(scores, relevant, top_k=10).item(),
        retrieval_reciprocal_rank(scores, relevant, top_k=10).item(),
    )
