"""`jsarag bench quality`'s paired bootstrap: per-example scores, corpus BLEU from per-example counts, intervals."""
from __future__ import annotations

import random

import numpy as np
import pytest

from jsarag.metrics import generation_metrics
from jsarag.tools.bench_quality import ExampleScores, bleu_counts, corpus_bleu, paired_bootstrap, resampled_metric

WORDS = "the a salt bake for ten minutes at high heat oven dough rise".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 7)))


@pytest.mark.parametrize("seed", range(5))
def test_corpus_bleu_from_per_example_counts_is_the_metrics_bleu(seed):
    rng = random.Random(seed)
    predictions = [_sentence(rng) for _ in range(30)]
    references = [[_sentence(rng) or "salt" for _ in range(rng.randint(1, 3))] for _ in range(30)]
    counts = np.array([bleu_counts(p, r) for p, r in zip(predictions, references)]).sum(0, keepdims=True)
    expected = generation_metrics(predictions, references)
    for name, order in (("bleu1", 1), ("bleu4", 4)):
        assert float(corpus_bleu(counts, order)[0]) == pytest.approx(expected[name], abs=1e-6), name


def _scores(values: dict[str, np.ndarray], n: int) -> ExampleScores:
    full = {m: values.get(m, np.zeros(n)) for m in ("recall@1", "recall@10", "mrr@10", "em", "f1", "rougeL")}
    return ExampleScores([f"e{i}" for i in range(n)], full, np.zeros((n, 10)))


def test_the_paired_interval_finds_a_small_consistent_gain_and_no_gain_between_equals():
    rng = np.random.default_rng(0)
    n = 200
    hard = rng.random(n)  # examples differ a lot in difficulty; the treatment adds 0.02 to every one of them
    base = [_scores({"f1": hard + rng.normal(0, 0.01, n)}, n) for _ in range(3)]
    better = [_scores({"f1": hard + 0.02 + rng.normal(0, 0.01, n)}, n) for _ in range(3)]
    out = paired_bootstrap({"jsa": better, "rag": base}, "jsa", resamples=2000)
    f1 = out["f1"]
    assert f1["baseline"] == "rag" and f1["diff"] == pytest.approx(0.02, abs=0.003)
    assert f1["excludes_zero"] and 0 < f1["ci95"][0] < f1["diff"] < f1["ci95"][1] < 0.03
    # unpaired, the spread of the examples' difficulty (sd 0.29 / sqrt(200) = 0.02) would swamp a 0.02 gain
    same = paired_bootstrap({"jsa": base, "rag": base}, "jsa", resamples=500)
    assert same["f1"]["diff"] == 0 and same["f1"]["ci95"] == [0.0, 0.0] and not same["f1"]["excludes_zero"]


def test_the_best_other_estimator_is_chosen_per_metric():
    n = 50
    a = _scores({"em": np.full(n, 0.5), "f1": np.full(n, 0.2)}, n)
    b = _scores({"em": np.full(n, 0.1), "f1": np.full(n, 0.6)}, n)
    treatment = _scores({"em": np.full(n, 0.4), "f1": np.full(n, 0.4)}, n)
    out = paired_bootstrap({"jsa": [treatment], "a": [a], "b": [b]}, "jsa", resamples=100)
    assert (out["em"]["baseline"], out["f1"]["baseline"]) == ("a", "b")
    assert out["em"]["diff"] == pytest.approx(-0.1) and out["f1"]["diff"] == pytest.approx(-0.2)


def test_resampling_weights_select_examples():
    scores = _scores({"em": np.array([1.0, 0.0, 0.0, 1.0])}, 4)
    weights = np.array([[1, 1, 1, 1], [4, 0, 0, 0], [0, 2, 2, 0]])
    np.testing.assert_allclose(resampled_metric(scores, "em", weights), [0.5, 1.0, 0.0])
