"""``jsarag bench kb``: what a knowledge base past one machine's RAM costs, on a synthetic KB this command writes.

For each size P it writes ``passages.jsonl`` (60-120 random words a passage) and embeds it with a hashed encoder
(deterministic clustered unit vectors of each text: no encoder time, so the figures are the framework's own),
through ``Context.passage_index`` in jobs started by the ``deepspeed`` launcher, the way a run embeds and indexes:

- build: every index setup is embedded (float16 vectors, shards of ``--shard-rows``) and built with the largest
  ``--ranks``; the first setup's build is killed (SIGKILL, ``JSARAG_FAULT=embed_shard:N``) after each rank finished
  ``--kill-after`` shards and run again: how many shards it reused, how many rows it encoded, and whether its vectors
  equal an uninterrupted build's;
- load: for every rank count, a fresh job loads the converted KB and the built index (seconds), searches
  ``--queries`` queries (noisy copies of random passages) in batches, and reports each rank's peak RSS (VmHWM),
  its RSS after loading and its anonymous RSS (memory of its own, not page cache), search q/s and recall@k against
  exact search (float32 over the same vectors, computed here).

It prints a Markdown table (and writes JSON with ``--out``); generated files go to ``--workdir`` and are deleted
unless ``--keep``.

    jsarag bench kb --passages 100000 1000000 2000000 --ranks 1 2 --workdir /tmp/bench-kb
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

GIB, MIB = 2**30, 2**20
ENCODER = "bench-hashed-v1"
SETUPS: dict[str, tuple[str, dict[str, Any]]] = {
    "torch_exact": ("torch_exact", {"dtype": "float16"}),  # sharded exact, float16 shards
    "faiss_flat_shard": ("faiss", {"type": "flat", "shard": True}),  # sharded exact, FAISS float32 per rank
    "faiss_flat": ("faiss", {"type": "flat"}),  # whole on every rank, memory-mapped
    "faiss_ivf": ("faiss", {"type": "ivf", "nlist": 1024, "nprobe": 16}),  # approximate, memory-mapped (lists
    # capped at 1,024 so that k-means fits this benchmark's time on a CPU; the default would be 4·sqrt(P))
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jsarag bench kb``."""
    parser.add_argument("--passages", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000],
                        help="KB sizes P")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts the built KB is loaded with")
    parser.add_argument("--setups", default="torch_exact,faiss_flat_shard,faiss_flat",
                        help=f"comma-separated subset of {','.join(SETUPS)}")
    parser.add_argument("--dim", type=int, default=384, help="vector size d (MiniLM: 384)")
    parser.add_argument("--queries", type=int, default=256, help="queries searched per load job")
    parser.add_argument("--batch", type=int, default=64, help="queries per search call")
    parser.add_argument("-k", type=int, default=10, help="top-k searched and recall@k")
    parser.add_argument("--shard-rows", type=int, default=32_768, help="passages per embedding shard")
    parser.add_argument("--kill-after", type=int, default=0,
                        help="shards each rank finishes before the kill (0: half of its shards)")
    parser.add_argument("--workdir", type=Path, help="where generated files go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated passages, KB cache and indexes")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")


# -- the synthetic KB and its hashed encoder ------------------------------------------------------------------------

def write_passages(path: Path, n: int, seed: int = 0) -> None:
    """Write n passages of 60-120 random words (from 20,000 made-up words) as JSONL, 100,000 at a time."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 10)))
                           for _ in range(20_000)])
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as out:
        for start in range(0, n, 100_000):
            count = min(100_000, n - start)
            lengths = rng.integers(60, 121, size=count)
            words = vocabulary[rng.integers(0, len(vocabulary), size=int(lengths.sum()))]
            cuts = np.cumsum(lengths)[:-1]
            for i, text in enumerate(np.split(words, cuts)):
                out.write(json.dumps({"id": f"doc-{start + i}", "title": f"T{(start + i) % 997}" if i % 3 else "",
                                      "text": " ".join(text)}) + "\n")
    os.replace(tmp, path)


class HashedEncoder:
    """texts -> (n, d) unit vectors: a text's 64-bit hash picks one of 1,000 seeded centres and seeds its noise."""

    def __init__(self, dim: int, clusters: int = 1_000) -> None:
        self.dim = dim
        self.centres = np.random.default_rng(0).standard_normal((clusters, dim)).astype(np.float32)
        self.rows = 0  # texts encoded by this process (padding included)

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.rows += len(texts)
        keys = np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts],
                        dtype=np.uint64)  # (n,)
        with np.errstate(over="ignore"):  # splitmix64 of (key, column): wraps by design
            x = keys[:, None] * np.uint64(0x9E3779B97F4A7C15) + np.arange(1, self.dim + 1, dtype=np.uint64)
            x ^= x >> np.uint64(30)
            x *= np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(27)
            x *= np.uint64(0x94D049BB133111EB)
            x ^= x >> np.uint64(31)
        noise = ((x >> np.uint64(40)).astype(np.float32) / 2**24 - 0.5) * np.float32(12 ** 0.5)  # (n, d) unit variance
        vectors = self.centres[keys % np.uint64(len(self.centres))] + 0.6 * noise
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# -- the jobs (run under the deepspeed launcher: python -m jsarag.tools.bench_kb --job FILE) ------------------------

def _memory() -> dict[str, int]:
    """This process's RSS, its peak (VmHWM) and anonymous RSS, in bytes."""
    found = {}
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                found[key] = int(value.split()[0]) * 1024
    return {"rss": found["VmRSS"], "peak": found["VmHWM"], "anon": found["RssAnon"]}


def _job_context(spec: dict[str, Any]):
    """The context (and loaded KB) of a job: a prior role whose recipe's index is the spec's setup."""
    import torch

    from jsarag.api import Context
    from jsarag.engine import init_distributed
    from jsarag.kb import load_kb
    from jsarag.plugins import get_plugins

    rank, world, device = init_distributed()
    torch.set_num_threads(spec["threads"])
    name, options = SETUPS[spec["setup"]]
    cls = get_plugins().component("index", name).cls  # plugins and FAISS imported before the clock starts
    import faiss  # noqa: F401
    before = _memory()
    started = time.perf_counter()
    kb = load_kb(Path(spec["passages_file"]))
    ctx = Context(role="prior", kb=kb, output_dir=Path(spec["workdir"]), cache_dir=Path(spec["workdir"]),
                  device=device, rank=rank, world_size=world)
    if "nlist" in options:  # at most P/39 lists (the index refuses fewer than 39 training points a list)
        options = {**options, "nlist": max(1, min(options["nlist"], len(kb) // 39))}
    ctx.new_index = lambda: cls(cls.Options(**options, dir=Path(spec["index_dir"])), ctx)
    return ctx, before, started


def run_job(spec: dict[str, Any]) -> None:
    """One rank of a build or load job; writes ``<results>/rank<r>.json``."""
    import torch.distributed as dist

    from jsarag.engine import shutdown

    ctx, before, started = _job_context(spec)
    encoder = HashedEncoder(spec["dim"])
    built = ctx.passage_index(ENCODER, encoder, batch_size=1024, dtype="float16", shard_rows=spec["shard_rows"])
    loaded = time.perf_counter() - started
    out: dict[str, Any] = {"rank": ctx.rank, "world": ctx.world_size, "load_s": loaded, "before": before,
                           "after_load": _memory(), "rows_encoded": encoder.rows, "meta": built.meta}
    if spec["job"] == "load":
        out.update(_search(built, ctx, spec))
        out["after_search"] = _memory()
    Path(spec["results"], f"rank{ctx.rank}.json").write_text(json.dumps(out))
    dist.barrier()
    shutdown(0)


def _search(built, ctx, spec: dict[str, Any]) -> dict[str, Any]:
    """Search this rank's share of the queries in equal numbers of batches (a sharded index needs them); time it."""
    import torch.distributed as dist

    queries = np.load(spec["queries_file"])  # (Q, d)
    mine = np.arange(ctx.rank, len(queries), ctx.world_size)
    batch, k = spec["batch"], spec["k"]
    calls = -(-len(queries) // (ctx.world_size * batch))
    built.search(queries[mine[:batch]], k)  # warm-up (first touches of a memory-mapped index)
    dist.barrier()
    started = time.perf_counter()
    rows = []
    for call in range(calls):
        part = mine[call * batch : (call + 1) * batch]
        found = built.search(queries[part if len(part) else mine[:1]], k)[1]
        rows.extend(zip(part.tolist(), found[: len(part)].tolist()))
    dist.barrier()
    return {"search_s": time.perf_counter() - started, "rows": rows}


# -- the orchestration ------------------------------------------------------------------------------------------------

def _launch(spec: dict[str, Any], ranks: int, env: dict[str, str] | None = None) -> tuple[int, list[dict]]:
    """Run a job with ``ranks`` ranks through the deepspeed launcher; return its exit code and the ranks' JSON."""
    results = Path(spec["results"])
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    job_file = results / "job.json"
    job_file.write_text(json.dumps(spec))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(ranks), "--master_port", str(port),
               "--module", "jsarag.tools.bench_kb", "--job", str(job_file)]
    threads = str(spec["threads"])
    environment = {**os.environ, "OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    (results / "log.txt").write_text(done.stdout + done.stderr)
    found = [json.loads(p.read_text()) for p in sorted(results.glob("rank*.json"))]
    return done.returncode, found


def _spec(args, workdir: Path, n: int, setup: str, job: str, ranks: int) -> dict[str, Any]:
    return {"job": job, "setup": setup, "dim": args.dim, "shard_rows": args.shard_rows, "batch": args.batch,
            "k": args.k, "workdir": str(workdir), "passages_file": str(workdir / f"passages-{n}.jsonl"),
            "index_dir": str(workdir / f"indexes-{n}-{setup}"), "queries_file": str(workdir / f"queries-{n}.npy"),
            "results": str(workdir / "results"), "threads": max(1, (os.cpu_count() or 1) // ranks)}


def _build(args, workdir: Path, n: int, setup: str, ranks: int, kill: bool) -> dict[str, Any]:
    """Build one setup with ``ranks`` ranks; with ``kill`` first kill the embedding and resume it."""
    spec = _spec(args, workdir, n, setup, "build", ranks)
    report: dict[str, Any] = {}
    if kill:
        shards = -(-n // args.shard_rows)
        after = args.kill_after or max(1, -(-shards // ranks) // 2)
        code, _ = _launch(spec, ranks, {"JSARAG_FAULT": f"embed_shard:{after}"})
        partial = next(Path(spec["index_dir"]).glob(".partial-*"), None)
        done = sorted((partial / "shards").glob("*")) if partial else []
        report.update(killed_exit=code, shards_done_at_kill=len(done),
                      rows_done_at_kill=sum(min(args.shard_rows, n - int(p.name) * args.shard_rows) for p in done))
    started = time.perf_counter()
    code, ranks_out = _launch(spec, ranks)
    if code or len(ranks_out) != ranks:
        raise SystemExit(f"bench kb: the build of {setup} at {n:,} failed; see {spec['results']}/log.txt")
    meta = ranks_out[0]["meta"]
    report.update(build_job_s=time.perf_counter() - started, embed_s=meta["embed_seconds"],
                  index_s=meta["build_seconds"], shards=meta["shards"], shards_reused=meta["shards_reused"],
                  rows_encoded=sum(r["rows_encoded"] for r in ranks_out), build_peak=max(r["after_load"]["peak"]
                                                                                        for r in ranks_out))
    folder = Path(spec["index_dir"]) / next(p.name for p in Path(spec["index_dir"]).iterdir()
                                             if not p.name.startswith("."))
    report["folder"] = str(folder)
    report["bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    report["leftovers"] = sorted(p.name for p in Path(spec["index_dir"]).iterdir() if p.name.startswith("."))
    return report


def exact_queries(vectors_path: Path, out: Path, count: int, k: int, block: int = 262_144) -> np.ndarray:
    """Write ``count`` noisy copies of random passages' vectors to ``out``; return their exact top-k rows (float32
    inner products over ``block`` rows at a time), (count, k)."""
    import torch

    vectors = np.load(vectors_path, mmap_mode="r")
    rng = np.random.default_rng(1)
    base = np.asarray(vectors[np.sort(rng.choice(len(vectors), count, replace=False))], np.float32)
    queries = base + 0.05 * rng.standard_normal(base.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np.save(out, queries)
    q = torch.from_numpy(queries)
    best_scores = torch.full((count, k), float("-inf"))
    best_rows = torch.full((count, k), -1, dtype=torch.long)
    for start in range(0, len(vectors), block):
        part = torch.from_numpy(np.asarray(vectors[start : start + block], np.float32))  # (block, d)
        top = (q @ part.T).topk(min(k, len(part)), dim=1)
        scores = torch.cat([best_scores, top.values], 1)
        rows = torch.cat([best_rows, top.indices + start], 1)
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
        best_scores, best_rows = scores.gather(1, order), rows.gather(1, order)
    return best_rows.numpy()


def _load(args, workdir: Path, n: int, setup: str, ranks: int, exact: np.ndarray) -> dict[str, Any]:
    """Load the built setup with ``ranks`` ranks in a fresh job and search; return the figures."""
    spec = _spec(args, workdir, n, setup, "load", ranks)
    code, found = _launch(spec, ranks)
    if code or len(found) != ranks:
        raise SystemExit(f"bench kb: loading {setup} at {n:,} on {ranks} ranks failed; see {spec['results']}/log.txt")
    if any(r["rows_encoded"] for r in found):
        raise SystemExit(f"bench kb: the load job of {setup} re-embedded the KB (the build was not found)")
    rows = dict(row for r in found for row in map(tuple, r["rows"]))
    return {"load_s": max(r["load_s"] for r in found), "qps": len(rows) / max(r["search_s"] for r in found),
            **recall(rows, exact, args.k), "ranks": [{key: r[key] for key in ("before", "after_load", "after_search")} for r in found]}


def recall(found: dict[int, list[int]], exact: np.ndarray, k: int) -> dict[str, float]:
    """recall@1 (the exact best row found first) and recall@k (the share of the exact top-k found in the top-k)."""
    queries = sorted(found)
    return {"recall_at_1": float(np.mean([found[q][0] == exact[q][0] for q in queries])),
            "recall_at_k": float(np.mean([len(set(found[q][:k]) & set(exact[q][:k].tolist())) / k for q in queries]))}


def _same_vectors(a: Path, b: Path) -> bool:
    """Whether two vectors.npy files hold the same values (read in chunks)."""
    x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
    return x.shape == y.shape and all(np.array_equal(x[i : i + 262_144], y[i : i + 262_144])
                                      for i in range(0, len(x), 262_144))


def bench_size(args, workdir: Path, n: int, setups: list[str]) -> list[dict[str, Any]]:
    """Every figure for one KB size."""
    passages = workdir / f"passages-{n}.jsonl"
    if not passages.is_file():
        started = time.perf_counter()
        write_passages(passages, n)
        print(f"  wrote {passages} in {time.perf_counter() - started:.0f} s", flush=True)
    built = {s: _build(args, workdir, n, s, max(args.ranks), kill=(i == 0)) for i, s in enumerate(setups)}
    for setup, report in built.items():
        print(f"  built {setup}: {report}", flush=True)
    first = Path(built[setups[0]]["folder"])
    if len(setups) > 1:
        built[setups[0]]["resumed_equals_clean"] = _same_vectors(first / "vectors.npy",
                                                                 Path(built[setups[1]]["folder"]) / "vectors.npy")
        built[setups[0]]["clean_rows_encoded"] = built[setups[1]]["rows_encoded"]
    exact = exact_queries(first / "vectors.npy", workdir / f"queries-{n}.npy", args.queries, args.k)
    rows = []
    for ranks in args.ranks:
        for setup in setups:
            figures = _load(args, workdir, n, setup, ranks, exact)
            rows.append({"passages": n, "dim": args.dim, "setup": setup, "world": ranks, **figures,
                         "build": built[setup]})
            print("  " + _row(rows[-1]), flush=True)
    if not args.keep:
        for setup in setups:
            shutil.rmtree(workdir / f"indexes-{n}-{setup}", ignore_errors=True)
        passages.unlink(missing_ok=True)
        (workdir / f"queries-{n}.npy").unlink(missing_ok=True)
        shutil.rmtree(workdir / "kb-cache", ignore_errors=True)
    return rows


HEADER = ["passages", "setup", "ranks", "vectors GiB", "index files GiB", "load s", "peak RSS GiB per rank (anon)",
          "target GiB", "search q/s", "recall@1", "recall@k", "embed s", "index build s", "resume"]


def _row(r: dict[str, Any]) -> str:
    """One Markdown table row."""
    vector_bytes = r["passages"] * r["dim"] * 2
    peaks = [x["after_search"]["peak"] for x in r["ranks"]]
    anon = [x["after_search"]["anon"] for x in r["ranks"]]
    target = vector_bytes / 2 + 1.5 * GIB
    b = r["build"]
    resume = ""
    if "shards_done_at_kill" in b:
        resume = (f"killed with {b['shards_done_at_kill']}/{b['shards']} shards done; resumed {b['shards_reused']}, "
                  f"encoded {b['rows_encoded']:,} rows"
                  + (f" (a clean build: {b['clean_rows_encoded']:,})" if "clean_rows_encoded" in b else "")
                  + (", vectors equal" if b.get("resumed_equals_clean") else ""))
    cells = [f"{r['passages']:,}", r["setup"], str(r["world"]), f"{vector_bytes / GIB:.2f}",
             f"{(b['bytes'] - vector_bytes) / GIB:.2f}", f"{r['load_s']:.2f}",
             " / ".join(f"{p / GIB:.2f} ({a / GIB:.2f})" for p, a in zip(peaks, anon)), f"{target / GIB:.2f}",
             f"{r['qps']:,.0f}", f"{r['recall_at_1']:.3f}", f"{r['recall_at_k']:.3f}", f"{b['embed_s']:.0f}",
             f"{b['index_s']:.0f}", resume]
    return "| " + " | ".join(cells) + " |"


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table."""
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = sorted(set(setups) - set(SETUPS))
    if unknown or not setups:
        raise SystemExit(f"jsarag bench kb: unknown setups {unknown}; known: {', '.join(SETUPS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="jsarag-bench-kb-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["JSARAG_KB_CACHE"] = str(workdir / "kb-cache")  # the jobs inherit it
    rows = []
    for n in args.passages:
        print(f"{n:,} passages x {args.dim} dims:", flush=True)
        rows.extend(bench_size(args, workdir, n, setups))
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
    print("\n".join(map(_row, rows)))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":  # one rank of a job, started by the deepspeed launcher
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    run_job(json.loads(parser.parse_known_args(sys.argv[1:])[0].job.read_text()))
