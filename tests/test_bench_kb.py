"""`jsarag bench kb`'s pieces: the synthetic KB and its hashed encoder, the exact top-k it measures recall against, the
recall it reports, its option check. (The benchmark itself is a command: `jsarag bench kb`, README "Retrieval".)"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from jsarag.tools.bench_kb import HashedEncoder, add_arguments, exact_queries, main, recall, write_passages


def test_the_synthetic_kb_and_its_hashed_vectors_depend_only_on_the_text(tmp_path):
    write_passages(tmp_path / "passages.jsonl", 250)
    lines = [json.loads(line) for line in (tmp_path / "passages.jsonl").read_text().splitlines()]
    assert len(lines) == 250 and len({line["id"] for line in lines}) == 250
    texts = [line["text"] for line in lines[:40]]

    encoder = HashedEncoder(32)
    together = encoder(texts)  # (40, 32)
    alone = np.concatenate([encoder(texts[i : i + 7]) for i in range(0, 40, 7)])  # other batches, same rows
    np.testing.assert_array_equal(together, alone)  # a resumed build's vectors equal a clean one's
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1, rtol=1e-5)
    assert together.dtype == np.float32 and encoder.rows == 80
    assert len(np.unique(together.round(4), axis=0)) == 40  # distinct texts, distinct vectors
    np.testing.assert_array_equal(HashedEncoder(32)(texts[:3]), together[:3])  # the same in every process


def test_exact_queries_are_the_true_top_k_across_blocks(tmp_path):
    vectors = np.random.default_rng(3).standard_normal((1000, 16)).astype(np.float16)  # (P, d)
    np.save(tmp_path / "vectors.npy", vectors)
    rows = exact_queries(tmp_path / "vectors.npy", tmp_path / "queries.npy", count=20, k=5, block=128)  # 8 blocks
    queries = np.load(tmp_path / "queries.npy")  # (20, 16)
    assert rows.shape == (20, 5) and queries.shape == (20, 16)
    want = np.argsort(-(queries @ vectors.astype(np.float32).T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(rows, want)


def test_recall_counts_the_exact_best_row_and_the_shared_top_k():
    exact = np.array([[1, 5, 3], [7, 8, 9]])
    found = {0: [1, 2, 3], 1: [9, 8, 7]}
    assert recall(found, exact, 3) == {"recall_at_1": 0.5, "recall_at_k": pytest.approx((2 / 3 + 1) / 2)}


def test_an_unknown_setup_is_refused_before_anything_is_written(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--setups", "torch_exact,faiss_hnsw", "--workdir", str(tmp_path / "w")])
    with pytest.raises(SystemExit, match="unknown setups \\['faiss_hnsw'\\]; known: torch_exact"):
        main(args)
    assert not (tmp_path / "w").exists()
