"""Run by tests/test_retrieval.py under `deepspeed --num_gpus 2`: embed a KB with every rank, build a
``torch_exact`` index sharded across the ranks, search with a different number of queries on each rank, do the same
with sharded ``faiss`` flat and IVF indexes, and write what rank 0 sees (the embedded vectors stay in the index
folder) as JSON.

    deepspeed --num_gpus 2 tests/torch_exact_shards.py --workdir DIR --out results.json
"""
from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np
import torch

DIM, PASSAGES = 16, 101  # an odd KB: the two shards differ in size


class FakeKB:
    """Just what embedding needs of a KnowledgeBase: rows, rendered text, a fingerprint and a path."""

    path = Path("fake/passages.jsonl")
    fingerprint = "fake-kb-v1"

    def __len__(self) -> int:
        return PASSAGES

    def render(self, row: int) -> str:
        return f"passage {row} on topic {row % 7}"

    def render_many(self, rows: list[int]) -> list[str]:
        return [self.render(r) for r in rows]


def hashed_vectors(texts: list[str]) -> np.ndarray:
    """(n, DIM) unit vectors, a deterministic function of each text."""
    out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(DIM) for t in texts])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def query_vectors() -> np.ndarray:
    """(15, DIM) queries: noisy copies of some passages' vectors."""
    base = hashed_vectors([FakeKB().render(r) for r in range(0, PASSAGES, 7)])
    return base + np.random.default_rng(1).standard_normal(base.shape).astype(np.float32) * 0.3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()

    from jsarag.api import Context
    from jsarag.engine import init_distributed, shutdown
    from jsarag_plugins.indexes.faiss_index import FaissIndex, FaissOptions
    from jsarag_plugins.indexes.torch_exact import TorchExactIndex, TorchExactOptions

    rank, world, device = init_distributed()
    ctx = Context(role="prior", kb=FakeKB(), output_dir=args.workdir, cache_dir=args.workdir, device=device,
                  rank=rank, world_size=world)
    ctx.new_index = lambda: TorchExactIndex(TorchExactOptions(block_size=16, dir=args.workdir / "indexes"), ctx)
    built = ctx.passage_index("hashed-v1", hashed_vectors, batch_size=8)
    index = built.index
    queries = query_vectors()  # (Q, d), the same on every rank
    mine = queries[:7] if rank == 0 else queries[7:12]  # ranks ask different numbers of queries
    scores, rows = index.search(mine, 5)
    again = index.search(queries[12:] if rank == 0 else queries[12:13], 3)[1]  # a second collective call
    faiss_rows, folders = {}, {}
    for name, options in {"flat": FaissOptions(shard=True), "ivf": FaissOptions(type="ivf", shard=True)}.items():
        ctx.new_index = lambda o=options: FaissIndex(o.model_copy(update={"dir": args.workdir / name}), ctx)
        sharded = ctx.passage_index("hashed-v1", hashed_vectors, batch_size=8)
        faiss_rows[name] = sharded.search(mine, 5)[1].tolist()
        folders[name] = str(sharded.folder)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, {"rows": rows.tolist(), "scores": scores.tolist(),
                                                   "again": again.tolist(), "shard": len(index.shard),
                                                   "faiss": faiss_rows})
    if rank == 0:
        args.out.write_text(json.dumps({"world": world, "folder": str(built.folder), "ranks": gathered,
                                        "faiss_folders": folders}))
    shutdown(0)


if __name__ == "__main__":
    main()
