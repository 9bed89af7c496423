"""Retrieval: every index type finds the flat index's top-1; sharded torch_exact equals one rank; a fingerprint
mismatch is an error; BM25 ranks an exact-term match first; a refresh re-embeds the KB after the passage encoder
moves, in a unit test and in a training run; `jsarag index info|search` work."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from conftest import REPO, _free_port, child_env, run_cli
from jsarag.api import Batch, Context, Example
from jsarag.candidates import candidate_set, ranked
from jsarag.data import load_examples, render_query, split_path
from jsarag.errors import IndexMismatchError, RecipeError
from jsarag.kb import load_kb
from jsarag.passages import cached_folders, index_dir, read_meta
from jsarag.recipe import CandidatesConfig
from jsarag_plugins.indexes.faiss_index import MIN_POINTS, FaissIndex, FaissOptions, _gpu_available
from jsarag_plugins.indexes.torch_exact import TorchExactIndex, TorchExactOptions
from jsarag_plugins.retrievers.dense import last_refresh, parse_refresh, refresh_due
from torch_exact_shards import FakeKB, hashed_vectors, query_vectors


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """FAISS k-means crawls when its OpenMP threads fight other processes for 2 cores: use one."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _ctx(tmp_path: Path, kb=None, index: FaissOptions | None = None) -> Context:
    """The context of a prior retriever whose recipe's index is ``faiss`` with ``index`` options."""
    ctx = Context(role="prior", kb=kb, output_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                  device=torch.device("cpu"), history_turns=0)
    ctx.new_index = lambda: FaissIndex(index or FaissOptions(), ctx)
    return ctx


@pytest.fixture(scope="module")
def easy_set(tmp_path_factory):
    """2,000 random unit vectors (d=32) on disk, and 100 queries that are slightly moved copies of the first 100."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("easy") / "vectors.npy"
    np.save(path, vectors)
    queries = vectors[:100] + 0.05 * rng.standard_normal((100, 32)).astype(np.float32)
    return np.load(path, mmap_mode="r"), queries


INDEXES = {
    "flat_fp16": (FaissIndex, FaissOptions(float16=True)),
    "ivf": (FaissIndex, FaissOptions(type="ivf", nprobe=8)),
    "hnsw": (FaissIndex, FaissOptions(type="hnsw", ef_search=32)),
    "hnsw_fp16": (FaissIndex, FaissOptions(type="hnsw", float16=True)),
    "ivfpq": (FaissIndex, FaissOptions(type="ivfpq", nprobe=16, pq_m=16)),
    "factory": (FaissIndex, FaissOptions(factory="IVF16,SQ8")),
    "flat_shard": (FaissIndex, FaissOptions(shard=True)),  # one rank: its part is the whole KB
    "ivf_shard": (FaissIndex, FaissOptions(type="ivf", shard=True, nprobe=8)),
    "flat_in_ram": (FaissIndex, FaissOptions(mmap=False)),
    "torch_exact": (TorchExactIndex, TorchExactOptions(block_size=300)),
    "torch_exact_bf16": (TorchExactIndex, TorchExactOptions(dtype="bfloat16")),
}


@pytest.mark.parametrize("name", INDEXES)
def test_every_index_type_returns_the_flat_top1(name, easy_set, tmp_path):
    vectors, queries = easy_set
    flat = FaissIndex(FaissOptions(), _ctx(tmp_path))
    flat.build(vectors)
    expected = flat.search(queries, 5)[1][:, 0]
    assert (expected == np.arange(100)).all()  # the set is easy: each query's source passage

    cls, options = INDEXES[name]
    index = cls(options, _ctx(tmp_path))
    index.build(vectors)
    assert index.ntotal == len(vectors)
    scores, rows = index.search(queries, 5)
    assert rows.shape == scores.shape == (100, 5)
    np.testing.assert_array_equal(rows[:, 0], expected)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first

    index.save(tmp_path)  # and back from disk (the folder holds vectors.npy for torch_exact)
    np.save(tmp_path / "vectors.npy", np.asarray(vectors))
    again = cls(options, _ctx(tmp_path))
    again.load(tmp_path)
    np.testing.assert_array_equal(again.search(queries, 5)[1][:, 0], expected)


def test_search_knobs_are_not_part_of_the_cache_key(tmp_path):
    fingerprint = lambda **o: FaissIndex(FaissOptions(**o), _ctx(tmp_path)).fingerprint_options()  # noqa: E731
    assert fingerprint(type="ivf", nprobe=1) == fingerprint(type="ivf", nprobe=64)
    assert fingerprint(type="hnsw", ef_search=8, device="cpu") == fingerprint(type="hnsw")
    assert fingerprint(mmap=False) == fingerprint()
    assert len({fingerprint(), fingerprint(float16=True), fingerprint(type="ivf"), fingerprint(type="ivfpq"),
                fingerprint(type="ivf", nlist=8), fingerprint(factory="IVF16,SQ8"), fingerprint(shard=True)}) == 7


LOAD_AND_MEASURE = """
import json, os, sys
import faiss, numpy as np, torch
from pathlib import Path
from jsarag.api import Context
from jsarag_plugins.indexes.faiss_index import FaissIndex, FaissOptions
def anon():
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
folder, options = Path(sys.argv[1]), json.loads(sys.argv[2])
ctx = Context(role="index", kb=None, output_dir=folder, cache_dir=folder, device=torch.device("cpu"))
before = anon()
index = FaissIndex(FaissOptions(**options), ctx)
index.load(folder)
grown = anon() - before
rows = index.search(np.load(folder / "vectors.npy")[:20], 5)[1]
print(json.dumps({"grown": grown, "rows": rows.tolist()}))
"""


@pytest.mark.parametrize("options", [{}, {"type": "ivf"}])
def test_a_built_faiss_index_is_read_memory_mapped(options, tmp_path):
    vectors = np.random.default_rng(0).standard_normal((40_000, 64)).astype(np.float32)  # 10 MiB of codes
    built = FaissIndex(FaissOptions(**options), _ctx(tmp_path))
    built.build(vectors)
    built.save(tmp_path)
    np.save(tmp_path / "vectors.npy", vectors)
    expected = built.search(vectors[:20], 5)[1].tolist()
    grown = {}
    for mmap in (True, False):  # each in a fresh process: freed heap would hide the growth
        done = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(tmp_path), json.dumps({**options,
                              "mmap": mmap})], capture_output=True, text=True, check=True, cwd=REPO,
                              env=child_env(OMP_NUM_THREADS="1"))
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["rows"] == expected
        grown[mmap] = result["grown"]
    assert grown[True] < 3 * 2**20 < 8 * 2**20 < grown[False]  # mapped: the codes stay in the page cache


def test_ivf_and_pq_parameters_follow_faiss_guidance(tmp_path):
    def index(**options) -> FaissIndex:
        return FaissIndex(FaissOptions(**options), _ctx(tmp_path))

    ivf = index(type="ivf")
    for n in (40, 2_000, 100_000, 2_000_000, 21_000_000):
        assert MIN_POINTS * ivf.nlist(n) <= n and ivf.train_size(n) >= MIN_POINTS * ivf.nlist(n)
    assert ivf.nlist(21_000_000) == 18_330 and ivf.train_size(21_000_000) == 64 * 18_330  # not 100k: 5.5 a list
    pq = index(type="ivfpq")
    assert pq.pq_m(384) == pq.pq_m(768) == 96 and pq.pq_m(16) == 4  # 96-byte codes: faiss-gpu's largest
    assert pq.factory_string(2_000_000, 768) == "IVF5656,PQ96x8np" and pq.train_size(2_000) == 2_000
    with pytest.raises(RecipeError, match=r"index.nlist: 100 lists need 39 training vectors each \(3,900\), and "
                                          r"the KB has 2,000; lower it or leave it null"):
        index(type="ivf", nlist=100).check_vectors(2_000, 32)
    with pytest.raises(RecipeError, match=r"index.train_sample: 1,000 vectors train 51 IVF lists, fewer than "
                                          r"FAISS's 39 a list; raise it to 1,989"):
        index(type="ivf", train_sample=1_000).check_vectors(2_000, 32)
    index(type="ivf", train_sample=1_989).check_vectors(2_000, 32)


@pytest.mark.parametrize(("options", "message"), [
    ({"type": "hnsw"}, "index.device: gpu, but FAISS has no GPU HNSW"),
    ({"type": "ivfpq", "pq_m": 192}, r"index.pq_m: 192 sub-quantisers \(192-byte codes\) cannot go to the GPU"),
    ({"type": "ivfpq", "pq_bits": 6}, "index.pq_bits: faiss-gpu's IVF-PQ needs 8-bit codes"),
    ({"type": "flat"}, "index.device: gpu, but FAISS sees no GPU"),
])
def test_device_gpu_for_an_index_that_cannot_go_there_is_refused(options, message, tmp_path):
    if _gpu_available() and options["type"] == "flat":
        pytest.skip("this machine has a GPU FAISS can use")
    with pytest.raises(RecipeError, match=message):
        FaissIndex(FaissOptions(**options, device="gpu"), _ctx(tmp_path)).check_vectors(2_000_000, 768)


def test_fingerprint_mismatch_is_detected(tiny_data, tmp_path):
    kb = load_kb(tiny_data / "passages.jsonl")
    options = FaissOptions(dir=tmp_path / "indexes")
    ctx = _ctx(tmp_path, kb, options)
    built = ctx.passage_index("hashed-v1", hashed_vectors, batch_size=5)
    vectors = built.vectors
    assert vectors.shape == (len(kb), 16) and isinstance(vectors, np.memmap)
    meta = read_meta(built.folder)
    assert meta["kb"] == kb.fingerprint and meta["encoder"] == "hashed-v1" and meta["index"] == "faiss:flat"
    assert vectors.dtype == np.float16  # the default storage
    np.testing.assert_allclose(vectors, hashed_vectors([kb.render(i) for i in range(len(kb))]), atol=1e-3)
    assert ctx.passage_index("hashed-v1", hashed_vectors, batch_size=5) is built  # one load per run

    ctx.passage_index("hashed-v2", hashed_vectors, batch_size=5)
    assert len(cached_folders(tmp_path / "indexes")) == 2  # another encoder: another folder, a rebuild

    (built.folder / "meta.json").write_text(json.dumps({**meta, "kb": "0" * 64}))  # e.g. copied from elsewhere
    with pytest.raises(IndexMismatchError, match="index built for another kb"):
        _ctx(tmp_path, kb, options).passage_index("hashed-v1", hashed_vectors, batch_size=5)  # another run
    (built.folder / "meta.json").write_text(json.dumps(meta))
    np.save(built.folder / "vectors.npy", np.zeros((3, 16), np.float32))
    with pytest.raises(IndexMismatchError, match="3 vectors for a KB of 24 passages"):
        _ctx(tmp_path, kb, options).passage_index("hashed-v1", hashed_vectors, batch_size=5)

    beside = index_dir("kb", ctx)
    assert beside == (tiny_data / ".jsarag-indexes").resolve() and beside.is_dir()
    assert index_dir(None, ctx) == tmp_path / "cache" / "indexes"


def test_refresh_schedule():
    schedule = parse_refresh("0-1000:500,1000-:1000")
    assert schedule == [(0, 1000, 500), (1000, None, 1000)]
    assert [s for s in range(0, 3001) if refresh_due(schedule, s)] == [500, 1000, 2000, 3000]
    assert last_refresh(schedule, 1999) == 1000 and last_refresh(schedule, 499) == 0
    for bad in ("0-1000", "10-5:2", "0-:0", "a-b:c"):
        with pytest.raises(ValueError, match="START-END:EVERY"):
            parse_refresh(bad)


def test_a_bad_refresh_schedule_names_the_key(tiny_recipe):
    from jsarag.recipe import load_recipe

    with pytest.raises(RecipeError, match=r"retriever.refresh: .*START-END:EVERY"):
        load_recipe(tiny_recipe(retriever={"refresh": "0-100"}))


def _example(question: str, answer: str = "") -> Example:
    return Example(id=question, context=(), question=question, answer=answer, answers=(answer,), gold_passage_ids=())


def test_bm25_ranks_an_exact_term_match_first(tmp_path):
    from jsarag_plugins.retrievers.bm25 import BM25Options, BM25Retriever

    texts = ["Boil the pasta in salted water.", "Roast the peppers until the skin blisters.",
             "Whisk the eggs with sugar.", "Grate the zucchini and squeeze out the water.", "Simmer the stock."]
    (tmp_path / "passages.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "title": "", "text": t}) + "\n"
                                                     for i, t in enumerate(texts)))
    ctx = _ctx(tmp_path, load_kb(tmp_path / "passages.jsonl"))
    retriever = BM25Retriever(BM25Options(), ctx)
    assert retriever.trainable() == {}

    found = ranked(Batch([_example("what about zucchini?")], [0]), retriever, 3, history_turns=0)
    assert found.rows[0, 0] == 3 and found.rows.shape == (1, 3)
    assert not found.prior_logits.requires_grad

    # as prior and posterior (the same fixed scorer reads x, then x + y), with an extra row, through the core
    batch = Batch([_example("how long do I cook it?", "boil the pasta")], [0])
    config = CandidatesConfig(prior_top_k=2, posterior_top_k=1, posterior_sep=" ")
    candidates = candidate_set(batch, retriever, retriever, config, len(ctx.kb), 0, extra_rows=[[4]])
    rows = candidates.rows[0].tolist()
    assert 0 in rows and 4 in rows  # the posterior (x + y) found the pasta; the extra row joined
    assert candidates.posterior_logits[0, rows.index(0)] == candidates.posterior_logits[0].max()


def test_bm25_scores_only_the_given_rows_and_takes_bm25s_top_k(tmp_path, monkeypatch):
    from jsarag.tools.bench_kb import write_passages
    from jsarag_plugins.retrievers.bm25 import BM25Options, BM25Retriever

    write_passages(tmp_path / "passages.jsonl", 500)
    kb = load_kb(tmp_path / "passages.jsonl")
    retriever = BM25Retriever(BM25Options(), _ctx(tmp_path, kb))
    model = retriever.scorer.model
    assert isinstance(model.scores["data"], np.memmap)  # loaded memory-mapped
    texts = [" ".join(kb.texts[r].split()[:5] + ["unheardofword"]) for r in range(0, 500, 9)]
    full = np.stack([model.get_scores(tokens) for tokens in retriever.scorer._tokenize(texts)])  # (B, P) reference
    queries = retriever.encode(texts)
    rows = torch.from_numpy(np.random.default_rng(0).integers(-1, 500, size=(len(texts), 30)))
    with monkeypatch.context() as patch:  # scoring rows never scores every passage
        patch.setattr(model, "get_scores", lambda *a, **k: pytest.fail("score() scored all passages"))
        got = retriever.score(queries, rows).numpy()
    want = np.where(rows.numpy() >= 0, np.take_along_axis(full, rows.clamp(min=0).numpy(), 1), -np.inf)
    np.testing.assert_array_equal(got, want)  # the same float32 sums bm25s makes

    top = retriever.search(queries, 10, train=False).numpy()  # (B, 10)
    best = -np.sort(-full, axis=1)[:, :10]
    np.testing.assert_array_equal(np.take_along_axis(full, top, 1), best)  # bm25s's top-k: the best scores
    same = np.diff(np.take_along_axis(full, top, 1), axis=1) == 0
    assert (np.diff(top, axis=1)[same] > 0).all()  # equal scores: the lower row first


@pytest.mark.launcher
def test_sharded_torch_exact_over_two_ranks_equals_one_rank(tmp_path):
    out = tmp_path / "out.json"
    command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()),
               str(REPO / "tests" / "torch_exact_shards.py"), "--workdir", str(tmp_path), "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=child_env(OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and [r["shard"] for r in result["ranks"]] == [51, 50]

    kb = FakeKB()
    vectors = np.load(Path(result["folder"]) / "vectors.npy")  # embedded by both ranks, half each
    np.testing.assert_allclose(vectors, hashed_vectors([kb.render(i) for i in range(len(kb))]), atol=1e-3)
    single = TorchExactIndex(TorchExactOptions(), _ctx(tmp_path))
    single.build(vectors)
    queries = query_vectors()
    scores, rows = single.search(queries, 5)
    sharded_rows = result["ranks"][0]["rows"] + result["ranks"][1]["rows"]  # rank 0 asked 7 queries, rank 1 five
    np.testing.assert_array_equal(np.array(sharded_rows), rows[:12])
    np.testing.assert_allclose(np.array(result["ranks"][0]["scores"] + result["ranks"][1]["scores"]), scores[:12],
                               rtol=1e-5)
    np.testing.assert_array_equal(np.array(result["ranks"][0]["again"]), single.search(queries[12:], 3)[1])
    np.testing.assert_array_equal(np.array(result["ranks"][1]["again"]), single.search(queries[12:13], 3)[1])
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(rows, exact)
    for name in ("flat", "ivf"):  # sharded FAISS: each rank searched its half, merged by all-gather
        np.testing.assert_array_equal(np.array(result["ranks"][0]["faiss"][name] + result["ranks"][1]["faiss"][name]),
                                      rows[:12])
    ivf_files = sorted(p.name for p in Path(result["faiss_folders"]["ivf"]).glob("index*.faiss"))
    assert ivf_files == ["index.0-of-2.faiss", "index.1-of-2.faiss"]  # each rank's part, cached
    assert not list(Path(result["faiss_folders"]["flat"]).glob("index*.faiss"))  # flat parts are cut at load


@pytest.fixture
def dense_with_trained_passages(tiny_recipe, tiny_data, tmp_path):
    """A dense retriever over tiny-bert whose passage encoder trains, refreshed every 2 steps, with BM25 extras."""
    from jsarag.recipe import load_recipe
    from jsarag_plugins.retrievers.dense import DenseRetriever

    recipe = load_recipe(tiny_recipe(retriever={"train_passages": True, "passage_lr": 1e-3, "rescore_pool": 6,
                                                "bm25_top_k": 2, "refresh": "0-:2"}))
    kb = load_kb(tiny_data / "passages.jsonl")
    return DenseRetriever(recipe.retriever.options, _ctx(tmp_path, kb, recipe.index.options))


def test_refresh_changes_the_index_after_the_passage_encoder_moves(dense_with_trained_passages, tiny_data):
    retriever = dense_with_trained_passages
    kb = retriever.ctx.kb
    before = np.array(retriever.passages.vectors)
    assert "passage_encoder" in retriever.trainable()
    with torch.no_grad():  # stands in for optimizer steps on the passage encoder
        for p in retriever.passage_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    retriever.on_step_end(step=1, loss=0.0, stats={})  # not on the schedule: the index stays
    np.testing.assert_array_equal(np.array(retriever.passages.vectors), before)
    retriever.on_step_end(step=2, loss=0.0, stats={})
    after = np.array(retriever.passages.vectors)
    live_folder = retriever.ctx.output_dir / "index-live" / "prior"
    assert retriever.passages.step == 2 and retriever.passages.folder == live_folder
    assert read_meta(live_folder)["step"] == 2
    assert np.abs(after - before).max() > 1e-2
    live = retriever._embed_live([kb.render(i) for i in range(len(kb))])
    np.testing.assert_allclose(after, live, atol=1e-3)  # stored as float16
    top1 = retriever.passages.search(live, 1)[1][:, 0]
    np.testing.assert_array_equal(top1, np.arange(len(kb)))  # the index searches the new vectors

    examples = load_examples(split_path(tiny_data, "train"), kb)
    batch = Batch(list(examples[:2]), [0, 1])
    candidates = candidate_set(batch, retriever, None, CandidatesConfig(prior_top_k=4), len(kb), 1, [])
    bm25_rows = retriever.bm25.top([render_query(ex, 1) for ex in batch.examples], 2)  # candidate_set keeps 1 turn
    for i in range(2):
        assert set(bm25_rows[i].tolist()) <= set(candidates.rows[i].tolist())
    candidates.prior_logits[candidates.mask].sum().backward()  # logits carry gradient into the passage encoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in retriever.passage_encoder.parameters())


def test_a_run_with_a_trained_passage_encoder_refreshes_and_is_searchable(tiny_recipe, tmp_path):
    recipe = tiny_recipe(retriever={"train_passages": True, "passage_lr": 1e-3, "rescore_pool": 8,
                                    "refresh": "0-:2"}, train={"max_steps": 3}, eval={"max_examples": 4})
    run_cli("train", "--config", str(recipe))
    live = tmp_path / "run" / "index-live" / "prior"
    assert read_meta(live)["step"] == 3  # refreshed at step 2 and at the end of training
    trained = read_meta(live)  # the session's shared cache holds other KBs embedded by the same encoder
    initial = next(f for f in cached_folders(Path(os.environ["JSARAG_CACHE"]) / "indexes")
                   if read_meta(f)["encoder"] + "+trained" == trained["encoder"] and read_meta(f)["kb"] == trained["kb"])
    assert np.abs(np.load(live / "vectors.npy") - np.load(initial / "vectors.npy")).max() > 1e-4

    info = run_cli("index", "info", "--config", str(recipe)).stdout
    assert f"folder         {live}" in info and "step           3" in info and "vectors.npy" in info
    found = run_cli("index", "search", "--query", "how long should I boil an egg", "-k", "3", "--config", str(recipe),
                    "eval.batch_size=1").stdout
    assert found.count(" row ") == 3 and "query: how long should I boil an egg" in found


def test_bm25_alone_is_a_fixed_prior_for_jsa(tiny_recipe, tmp_path):
    recipe = tiny_recipe(retriever={"name": "bm25"}, estimator={"name": "jsa", "proposals": 8}, train={"max_steps": 2}, eval={"max_examples": 4})
    run_cli("train", "--config", str(recipe))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final"]["dev"]["recall@10"] >= 0


def test_an_index_that_cannot_hold_the_vectors_fails_before_the_kb_is_embedded(tiny_data, tmp_path):
    kb = load_kb(tiny_data / "passages.jsonl")
    calls = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return hashed_vectors(texts)  # 16-d

    ctx = _ctx(tmp_path, kb, FaissOptions(type="ivfpq", pq_m=3, dir=tmp_path / "indexes"))
    with pytest.raises(RecipeError, match=r"index.pq_m: 3 does not divide the vector dimension 16"):
        ctx.passage_index("hashed-v1", encode, batch_size=4)
    assert calls == [4]  # one batch, not the 24 passages
    assert not list((tmp_path / "indexes").iterdir())  # and nothing left behind
