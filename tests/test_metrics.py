"""Tests of jsarag.metrics against values worked out by hand (the working is in each test)."""
from __future__ import annotations

import math
import sys

import pytest
from torchmetrics.functional.text import bleu_score

from jsarag.errors import DataError
from jsarag.metrics import (
    GENERATION_METRICS,
    RETRIEVAL_METRICS,
    MetricInputError,
    generation_metrics,
    retrieval_metrics,
)


def _one(prediction: str, references: list[str]) -> dict[str, float]:
    """Generation metrics of a single example."""
    return generation_metrics([prediction], [references])


# ---- EM / F1 (SQuAD normalisation) -------------------------------------------------------------------------------


def test_em_f1_ignore_articles_punctuation_and_case() -> None:
    # "The Eiffel Tower!" -> "eiffel tower"
    scores = _one("The Eiffel Tower!", ["eiffel   tower"])
    assert scores["em"] == 1.0
    assert scores["f1"] == 1.0


def test_em_takes_the_best_reference() -> None:
    # "an apple" -> "apple"; references "banana", "apple"  -> exact match with the second
    scores = _one("an apple", ["Banana", "APPLE."])
    assert scores["em"] == 1.0
    assert scores["f1"] == 1.0


def test_f1_partial_overlap() -> None:
    # pred [big, red, dog], ref [small, red, dog, barked]: 2 common; P = 2/3, R = 2/4 -> F1 = 4/7
    scores = _one("the big red dog", ["a small red dog barked"])
    assert scores["em"] == 0.0
    assert scores["f1"] == pytest.approx(4 / 7, abs=1e-6)


def test_f1_takes_the_best_reference() -> None:
    # vs "blue cat": 0; vs [red, dog, sat]: 2 common, P = 1, R = 2/3 -> F1 = 4/5
    scores = _one("red dog", ["blue cat", "the red dog sat"])
    assert scores["f1"] == pytest.approx(4 / 5, abs=1e-6)


def test_em_f1_mean_over_examples() -> None:
    # EM: 1, 0, 0 -> 1/3;  F1: 1, 4/7, 0 -> (1 + 4/7) / 3 = 11/21
    scores = generation_metrics(
        ["The Eiffel Tower!", "the big red dog", ""],
        [["eiffel tower"], ["a small red dog barked"], ["paris"]],
    )
    assert scores["em"] == pytest.approx(1 / 3, abs=1e-6)
    assert scores["f1"] == pytest.approx(11 / 21, abs=1e-6)


def test_empty_prediction_scores_zero() -> None:
    assert _one("", ["Paris is the capital"]) == {name: 0.0 for name in GENERATION_METRICS}


# ---- BLEU ---------------------------------------------------------------------------------------------------------


def test_bleu1_with_clipping_and_brevity_penalty() -> None:
    # pred "the cat the cat": the x2 (ref has 2), cat x2 (ref has 1) -> clipped 3 of 4 -> p1 = 3/4.
    # c = 4 < r = 6 -> BP = exp(1 - 6/4) = exp(-1/2).
    scores = _one("the cat the cat", ["the cat sat on the mat"])
    assert scores["bleu1"] == pytest.approx(0.75 * math.exp(-0.5), abs=1e-6)


def test_bleu1_is_corpus_level_with_closest_reference_length() -> None:
    # ex 1 as above: 3 of 4 unigrams match, r = 6.
    # ex 2 "a b c" vs {"a x", "a b c d e"}: all 3 unigrams match; closest ref length to 3 is 2 -> r = 2.
    # pooled: p1 = 6/7, c = 7, r = 8 -> BP = exp(1 - 8/7).
    scores = generation_metrics(["the cat the cat", "a b c"], [["the cat sat on the mat"], ["a x", "a b c d e"]])
    assert scores["bleu1"] == pytest.approx(6 / 7 * math.exp(1 - 8 / 7), abs=1e-6)


def test_bleu4_by_hand() -> None:
    # "a b c d e f" vs "a b c d e g": p1..p4 = 5/6, 4/5, 3/4, 2/3 (product 1/3), c = r -> BP = 1.
    scores = _one("a b c d e f", ["a b c d e g"])
    assert scores["bleu1"] == pytest.approx(5 / 6, abs=1e-6)
    assert scores["bleu4"] == pytest.approx((1 / 3) ** 0.25, abs=1e-6)


def test_bleu4_is_zero_without_a_matching_4gram() -> None:
    assert _one("a b c", ["a b c"])["bleu4"] == 0.0


def test_bleu_equals_torchmetrics_bleu_score() -> None:
    # We call torchmetrics' BLEU internals for speed; they must give what its public bleu_score gives.
    preds = ["the cat is on the mat", "", "a b c d e f g", "Paris is in France ."]
    refs = [["there is a cat on the mat", "a cat is on the mat"], ["x"], ["a b c d x f g", "b c d"], ["paris ."]]
    scores = generation_metrics(preds, refs)
    for n in (1, 4):
        assert scores[f"bleu{n}"] == pytest.approx(bleu_score(preds, refs, n_gram=n).item(), abs=1e-6)


# ---- ROUGE-L ------------------------------------------------------------------------------------------------------


def test_rouge_l_by_hand() -> None:
    # pred [the cat sat on the mat] (6), ref [the cat was sitting on the mat] (7); LCS "the cat on the mat" = 5.
    # P = 5/6, R = 5/7 -> F = 2PR / (P + R) = 10/13.  "dog" scores 0, so the best reference gives 10/13.
    scores = _one("The cat, sat on the mat!", ["dog", "the cat was sitting on the mat"])
    assert scores["rougeL"] == pytest.approx(10 / 13, abs=1e-6)


def test_rouge_l_mean_over_examples_and_no_nltk() -> None:
    scores = generation_metrics(["The cat, sat on the mat!", ""], [["the cat was sitting on the mat"], ["x"]])
    assert scores["rougeL"] == pytest.approx(5 / 13, abs=1e-6)
    assert "nltk" not in sys.modules


def test_generation_keys_and_ranges() -> None:
    scores = generation_metrics(["yes", "no idea"], [["yes"], ["maybe", "no"]])
    assert tuple(scores) == GENERATION_METRICS
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in scores.values())


# ---- retrieval ----------------------------------------------------------------------------------------------------


def test_retrieval_gold_at_rank_1() -> None:
    assert retrieval_metrics([["g", "x", "y"]], [["g"]]) == {"recall@1": 1.0, "recall@10": 1.0, "mrr@10": 1.0}


def test_retrieval_gold_at_rank_3() -> None:
    scores = retrieval_metrics([["a", "b", "g", "c"]], [["g"]])
    assert scores == {"recall@1": 0.0, "recall@10": 1.0, "mrr@10": pytest.approx(1 / 3)}


def test_retrieval_gold_at_rank_11_is_a_miss() -> None:
    ranking = [f"d{i}" for i in range(10)] + ["g"]
    assert retrieval_metrics([ranking], [["g"]]) == {"recall@1": 0.0, "recall@10": 0.0, "mrr@10": 0.0}


def test_retrieval_multiple_gold_ids_first_one_counts() -> None:
    scores = retrieval_metrics([["a", "g2", "g1"]], [["g1", "g2"]])
    assert scores == {"recall@1": 0.0, "recall@10": 1.0, "mrr@10": pytest.approx(1 / 2)}


def test_retrieval_short_or_empty_ranking_without_gold_scores_zero() -> None:
    zeros = {"recall@1": 0.0, "recall@10": 0.0, "mrr@10": 0.0}
    assert retrieval_metrics([["a", "b"]], [["g"]]) == zeros
    assert retrieval_metrics([[]], [["g"]]) == zeros


def test_retrieval_mean_skips_queries_without_gold() -> None:
    # queries 1-4 count (query 5 has no gold): R@1 = 1/4, R@10 = 3/4, MRR@10 = (1 + 1/3 + 0 + 1/2) / 4 = 11/24
    ranked = [["g", "x"], ["a", "b", "g"], [f"d{i}" for i in range(10)] + ["g"], ["a", "g2", "g1"], ["g"]]
    gold = [["g"], ["g"], ["g"], ["g1", "g2"], []]
    scores = retrieval_metrics(ranked, gold)
    assert tuple(scores) == RETRIEVAL_METRICS
    assert scores == {"recall@1": 0.25, "recall@10": 0.75, "mrr@10": pytest.approx(11 / 24)}
    assert all(isinstance(v, float) for v in scores.values())


def test_retrieval_all_without_gold_is_empty() -> None:
    assert retrieval_metrics([["a"], ["b"]], [[], []]) == {}


# ---- input checks -------------------------------------------------------------------------------------------------


def test_empty_inputs_give_empty_dicts() -> None:
    assert generation_metrics([], []) == {}
    assert retrieval_metrics([], []) == {}


def test_length_mismatch_names_both_lengths() -> None:
    with pytest.raises(ValueError, match=r"predictions has 2 items but references has 1"):
        generation_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"ranked_ids has 1 items but gold_ids has 3"):
        retrieval_metrics([["a"]], [["a"], ["b"], ["c"]])


def test_input_errors_are_jsarag_data_errors() -> None:
    with pytest.raises(DataError):
        generation_metrics(["a"], [])
    assert issubclass(MetricInputError, ValueError)


def test_bare_string_where_a_list_goes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"references\[0\] is the str 'paris'"):
        generation_metrics(["paris"], ["paris"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"gold_ids\[0\]"):
        retrieval_metrics([["p1", "p2"]], ["p1"])  # type: ignore[list-item]


def test_example_without_references_is_refused() -> None:
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        generation_metrics(["a", "b"], [["a"], []])
