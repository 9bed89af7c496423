"""``jsarag bench retrieval``: build and search throughput and recall@k of every index type, next to raw calls.

For each index type the framework's component (``faiss`` / ``torch_exact``) builds over a memory-mapped (P, d)
matrix and searches the queries in batches; the same work is then done with raw FAISS calls (the same factory
string, training sample and search knobs; for ``torch_exact``, a raw torch matmul + topk) on the same vectors in the
same process. Recall@1 and recall@k are measured against the exact flat result; ``ratio`` is the framework's time
over the raw time (its overhead). Vectors are synthetic (unit-normalised points around random cluster centres,
queries are perturbed passages) unless ``--vectors`` names a (P, d) .npy file.

    jsarag bench retrieval --passages 100000 --dim 384 --queries 2000 --batch 64 -k 10
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

TYPES = ("flat", "flat_fp16", "ivf", "hnsw", "ivfpq", "torch_exact")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jsarag bench retrieval``."""
    parser.add_argument("--passages", type=int, default=100_000, help="synthetic KB size P")
    parser.add_argument("--dim", type=int, default=384, help="vector dimension d (MiniLM: 384)")
    parser.add_argument("--queries", type=int, default=2_000, help="queries searched")
    parser.add_argument("--batch", type=int, default=64, help="queries per search call")
    parser.add_argument("-k", type=int, default=10, help="top-k searched and recall@k")
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated subset of {','.join(TYPES)}")
    parser.add_argument("--nprobe", type=int, default=16, help="IVF lists visited per query")
    parser.add_argument("--ef-search", type=int, default=64, help="HNSW efSearch")
    parser.add_argument("--vectors", type=Path, help="a (P, d) float32 .npy of real passage vectors instead")
    parser.add_argument("--workdir", type=Path, help="where the memory-mapped vectors go (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--repeat", type=int, default=3, help="timed search passes (the best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="FAISS and torch threads (0 = their default)")
    parser.add_argument("--seed", type=int, default=0)


@dataclass
class Row:
    """One index type's figures (seconds, queries per second, recall against exact search)."""

    index: str
    spec: str
    build_s: float
    raw_build_s: float
    qps: float
    raw_qps: float
    recall_at_1: float
    recall_at_k: float
    agree_at_k: float
    mib: float

    def cells(self) -> list[str]:
        return [self.index, f"`{self.spec}`", f"{self.build_s:.2f}", f"{self.raw_build_s:.2f}",
                f"{self.build_s / max(self.raw_build_s, 1e-9):.2f}", f"{self.qps:,.0f}", f"{self.raw_qps:,.0f}",
                f"{self.raw_qps / max(self.qps, 1e-9):.2f}", f"{self.recall_at_1:.3f}", f"{self.recall_at_k:.3f}",
                f"{self.agree_at_k:.3f}", f"{self.mib:.0f}"]


HEADER = ["index", "raw spec", "build s", "raw build s", "build ratio", "search q/s", "raw q/s", "search ratio",
          "recall@1", "recall@k", "same as raw@k", "MiB"]


def synthetic(path: Path, n: int, d: int, seed: int, clusters: int | None = None) -> np.memmap:
    """Write (n, d) unit vectors around random centres into a .npy memmap, in chunks; return it read-only."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters or max(1, n // 100), d)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for start in range(0, n, 65_536):
        m = min(65_536, n - start)
        block = centres[rng.integers(0, len(centres), m)] + 0.6 * rng.standard_normal((m, d)).astype(np.float32)
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    out.flush()
    return np.load(path, mmap_mode="r")


def make_queries(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, d) unit queries: random passages plus noise (each has a clear, but not trivial, nearest neighbour)."""
    rng = np.random.default_rng(seed + 1)
    base = np.asarray(vectors[np.sort(rng.choice(len(vectors), n, replace=False))], np.float32)
    noisy = base + 0.05 * rng.standard_normal(base.shape).astype(np.float32)
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def timed_search(search: Callable[[np.ndarray, int], tuple], queries: np.ndarray, batch: int, k: int):
    """Search in batches; return (rows (n, k), queries per second)."""
    started = time.perf_counter()
    rows = [search(queries[i : i + batch], k)[1] for i in range(0, len(queries), batch)]
    return np.concatenate(rows), len(queries) / (time.perf_counter() - started)


def race(ours: Callable, raw: Callable, queries: np.ndarray, args) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Search with both, alternating, ``--repeat`` times after a warm-up; return each one's rows and best q/s."""
    ours(queries[: args.batch], args.k), raw(queries[: args.batch], args.k)
    best = [0.0, 0.0]
    for _ in range(args.repeat):
        rows, qps = timed_search(ours, queries, args.batch, args.k)
        raw_rows, raw_qps = timed_search(raw, queries, args.batch, args.k)
        best = [max(best[0], qps), max(best[1], raw_qps)]
    return rows, best[0], raw_rows, best[1]


def recall(rows: np.ndarray, exact: np.ndarray, k: int) -> tuple[float, float]:
    """Recall@1 (same top row) and recall@k (share of the exact top-k found in the top-k)."""
    at_1 = float(np.mean(rows[:, 0] == exact[:, 0]))
    at_k = float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(rows, exact)]))
    return at_1, at_k


def _ctx(workdir: Path):
    import torch

    from jsarag.api import Context

    return Context(role="index", kb=None, output_dir=workdir, cache_dir=workdir, device=torch.device("cpu"))


def _index_class(name: str):
    """A registered index plugin's class (the benchmark measures plugins as recipes pick them)."""
    from jsarag.plugins import get_plugins

    return get_plugins().component("index", name).cls


def bench_faiss(kind: str, vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray, args) -> Row:
    """The ``faiss`` component against raw faiss.index_factory calls with the same string, sample and knobs."""
    import faiss

    FaissIndex = _index_class("faiss")  # noqa: N806 - a class
    options = FaissIndex.Options(type=kind.removesuffix("_fp16"), float16=kind.endswith("_fp16"), nprobe=args.nprobe,
                           ef_search=args.ef_search)
    component = FaissIndex(options, _ctx(args.workdir))
    started = time.perf_counter()
    component.build(vectors)
    build_s = time.perf_counter() - started

    spec = component.factory_string(*vectors.shape)
    started = time.perf_counter()
    in_ram = np.ascontiguousarray(vectors, np.float32)
    raw = faiss.index_factory(vectors.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        raw.hnsw.efConstruction = options.ef_construction
    if not raw.is_trained:
        n = len(in_ram)
        sample = in_ram if n <= options.train_sample else in_ram[
            np.sort(np.random.default_rng(0).choice(n, options.train_sample, replace=False))]
        raw.train(sample)
    raw.add(in_ram)
    raw_build_s = time.perf_counter() - started
    del in_ram
    space = faiss.ParameterSpace()
    if faiss.try_extract_index_ivf(raw) is not None:
        space.set_index_parameter(raw, "nprobe", args.nprobe)
    if kind == "hnsw":
        space.set_index_parameter(raw, "efSearch", args.ef_search)
    rows, qps, raw_rows, raw_qps = race(component.search, raw.search, queries, args)
    mib = faiss.serialize_index(raw).nbytes / 2**20
    at_1, at_k = recall(rows, exact, args.k)
    return Row(kind, spec, build_s, raw_build_s, qps, raw_qps, at_1, at_k, recall(rows, raw_rows, args.k)[1], mib)


def bench_torch_exact(vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray, args) -> Row:
    """The ``torch_exact`` component (one rank) against a raw torch matmul + topk on the same matrix."""
    import torch

    TorchExactIndex = _index_class("torch_exact")  # noqa: N806 - a class
    component = TorchExactIndex(TorchExactIndex.Options(), _ctx(args.workdir))
    started = time.perf_counter()
    component.build(vectors)
    build_s = time.perf_counter() - started

    started = time.perf_counter()
    matrix = torch.from_numpy(np.array(vectors, np.float32))  # (P, d)
    raw_build_s = time.perf_counter() - started

    def raw_search(q: np.ndarray, k: int):
        top = (torch.from_numpy(q) @ matrix.T).topk(k, dim=1)
        return top.values.numpy(), top.indices.numpy()

    rows, qps, raw_rows, raw_qps = race(component.search, raw_search, queries, args)
    at_1, at_k = recall(rows, exact, args.k)
    mib = component.shard.numel() * component.shard.element_size() / 2**20
    return Row("torch_exact", "torch (q @ X.T).topk", build_s, raw_build_s, qps, raw_qps, at_1, at_k,
               recall(rows, raw_rows, args.k)[1], mib)


def table(rows: list[Row]) -> str:
    """A Markdown table of the results."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(r.cells()) + " |" for r in rows])


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table (build ratio = jsarag / raw time; search ratio = raw / jsarag q/s)."""
    import faiss
    import torch

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    kinds = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = sorted(set(kinds) - set(TYPES))
    if unknown:
        raise SystemExit(f"jsarag bench retrieval: unknown index types {unknown}; known: {', '.join(TYPES)}")
    with tempfile.TemporaryDirectory(prefix="jsarag-bench-") as tmp:
        args.workdir = args.workdir or Path(tmp)
        args.workdir.mkdir(parents=True, exist_ok=True)
        if args.vectors:
            vectors = np.load(args.vectors, mmap_mode="r")
        else:
            vectors = synthetic(args.workdir / "vectors.npy", args.passages, args.dim, args.seed)
        queries = make_queries(vectors, args.queries, args.seed)
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(np.ascontiguousarray(vectors, np.float32))
        exact = flat.search(queries, args.k)[1]
        del flat
        print(f"{len(vectors):,} passages x {vectors.shape[1]} dims, {len(queries):,} queries in batches of "
              f"{args.batch}, k={args.k}, nprobe={args.nprobe}, efSearch={args.ef_search}, "
              f"{faiss.omp_get_max_threads()} FAISS / {torch.get_num_threads()} torch threads", flush=True)
        results = []
        for kind in kinds:
            row = bench_torch_exact(vectors, queries, exact, args) if kind == "torch_exact" else \
                bench_faiss(kind, vectors, queries, exact, args)
            results.append(row)
            print(f"  {kind}: done", flush=True)
        print(table(results))
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0
