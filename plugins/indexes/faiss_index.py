"""Index ``faiss``: the FAISS family over unit-normalised passage vectors (inner product = cosine).

``type`` picks ``flat`` (exact), ``ivf`` (inverted lists), ``hnsw`` (graph) or ``ivfpq`` (inverted lists with
product-quantised codes); ``factory`` takes any raw ``faiss.index_factory`` string instead. IVF and PQ quantisers
are trained on a seeded sample of the vectors; vectors are added in chunks read from the memory-mapped matrix.
With faiss-gpu and a GPU the index is placed on the run's GPU (HNSW stays on the CPU: FAISS has no GPU HNSW).
``nprobe`` and ``ef_search`` are search-time knobs: they are not part of the cache key, so they can be changed
on a built index (``index.nprobe=64``).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from jsarag.api import Context, Index, IndexOptions, RecipeError, hookimpl

log = logging.getLogger("jsarag.faiss")


class FaissOptions(IndexOptions):
    type: Literal["flat", "ivf", "hnsw", "ivfpq"] = "flat"
    """Index family: flat (exact), ivf, hnsw or ivfpq (approximate)."""
    factory: str | None = None
    """A raw faiss.index_factory string (e.g. "OPQ64,IVF4096,PQ64"); overrides type and its options."""
    float16: bool = False
    """Store vectors as float16 (flat/ivf/hnsw: SQfp16 codes; on a GPU: float16 storage and lookup tables)."""
    nlist: int | None = Field(None, ge=1)
    """IVF inverted lists (null = 4·sqrt(P), at most P/39 so that every list gets training points)."""
    pq_m: int | None = Field(None, ge=1)
    """PQ sub-quantisers, must divide the dimension (null = the largest divisor of d up to d/4)."""
    pq_bits: int = Field(8, ge=1, le=16)
    """Bits per PQ code (lowered on small KBs so that every code gets 39 training points)."""
    hnsw_m: int = Field(32, ge=2)
    """HNSW neighbours per node."""
    ef_construction: int = Field(80, ge=1)
    """HNSW efConstruction (build-time beam)."""
    train_sample: int = Field(100_000, ge=1)
    """Vectors sampled (seeded) to train IVF/PQ quantisers."""
    nprobe: int = Field(16, ge=1)
    """IVF lists visited per query (search time)."""
    ef_search: int = Field(64, ge=1)
    """HNSW efSearch (search time)."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """auto: the run's GPU when faiss-gpu is installed and the run has one; gpu: required; cpu: never."""
    add_batch_size: int = Field(65_536, ge=1)
    """Vectors added per chunk (bounds the RAM used to read the memory-mapped matrix)."""
    threads: int = Field(0, ge=0)
    """FAISS OpenMP threads (0 = FAISS's default)."""


class FaissIndex(Index):
    """A FAISS index over unit-normalised passage vectors."""

    Options = FaissOptions

    def __init__(self, options: FaissOptions, ctx: Context) -> None:
        super().__init__(options, ctx)
        import faiss

        self.index: faiss.Index | None = None
        self.on_gpu = False
        self._gpu_resources = None
        if options.threads:
            faiss.omp_set_num_threads(options.threads)

    @property
    def ntotal(self) -> int:
        """Passages indexed."""
        return int(self.index.ntotal) if self.index is not None else 0

    def fingerprint_options(self) -> str:
        """Return the options that change what is built (part of the cache key; search knobs are not)."""
        o = self.options
        if o.factory:
            return f"faiss:factory={o.factory}:sample={o.train_sample}"
        parts = {"flat": [], "ivf": [o.nlist], "hnsw": [o.hnsw_m, o.ef_construction],
                 "ivfpq": [o.nlist, o.pq_m, o.pq_bits]}[o.type]
        sample = [f"sample={o.train_sample}"] if o.type in ("ivf", "ivfpq") else []
        fp16 = ["fp16"] if o.float16 and o.type != "ivfpq" else []
        return ":".join(["faiss", o.type, *map(str, parts), *fp16, *sample])

    def check_vectors(self, count: int, dim: int) -> None:
        """Refuse a PQ code size that does not divide the vector size (the options name it)."""
        if self.options.type == "ivfpq" and not self.options.factory:
            m = self.options.pq_m or max(m for m in range(1, dim // 4 + 1) if dim % m == 0)
            if dim % m:
                raise RecipeError(f"index.pq_m: {m} does not divide the vector dimension {dim} of the retriever's "
                                  "passage vectors; pick a divisor")

    def factory_string(self, n: int, d: int) -> str:
        """The faiss.index_factory string for n vectors of dimension d."""
        o = self.options
        if o.factory:
            return o.factory
        codes = "SQfp16" if o.float16 else "Flat"
        nlist = o.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        if o.type == "flat":
            return codes
        if o.type == "ivf":
            return f"IVF{nlist},{codes}"
        if o.type == "hnsw":
            return f"HNSW{o.hnsw_m}" + (",SQfp16" if o.float16 else "")
        m = o.pq_m or max(m for m in range(1, d // 4 + 1) if d % m == 0)
        if d % m:
            raise RecipeError(f"index.pq_m: {m} does not divide the vector dimension {d}")
        bits = min(o.pq_bits, max(1, int(math.log2(max(2, min(n, o.train_sample) // 39)))))  # >= 39 points a code
        return f"IVF{nlist},PQ{m}x{bits}np"  # np: no polysemous training (slow, and unused here)

    def build(self, vectors: np.ndarray) -> None:
        """Build the index over (P, d) vectors (a memmap is read in chunks)."""
        import faiss

        n, d = vectors.shape
        spec = self.factory_string(n, d)
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        if self.options.type == "hnsw" and not self.options.factory:
            faiss.downcast_index(index).hnsw.efConstruction = self.options.ef_construction
        self.index = self._place(index)
        if not self.index.is_trained:
            self.index.train(self._training_sample(vectors))
        chunks = range(0, n, self.options.add_batch_size)
        for start in tqdm(chunks, desc=f"indexing ({spec})", unit="chunk", disable=len(chunks) < 4, mininterval=2):
            self.index.add(np.ascontiguousarray(vectors[start : start + self.options.add_batch_size], np.float32))
        self._set_search_knobs()
        log.info("built faiss index %s over %d vectors%s", spec, n, " on the GPU" if self.on_gpu else "")

    def _training_sample(self, vectors: np.ndarray) -> np.ndarray:
        """(S, d) seeded sample of the vectors, read row by row from the memmap in sorted order."""
        n = vectors.shape[0]
        if n <= self.options.train_sample:
            return np.ascontiguousarray(vectors, np.float32)
        rows = np.sort(np.random.default_rng(0).choice(n, self.options.train_sample, replace=False))
        return np.ascontiguousarray(vectors[rows], np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, rows), each (B, k), best first."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def save(self, folder: Path) -> None:
        """Write the index into ``folder``."""
        import faiss

        cpu = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        faiss.write_index(cpu, str(Path(folder) / "index.faiss"))

    def load(self, folder: Path) -> None:
        """Read the index from ``folder`` (onto the GPU when placed there)."""
        import faiss

        self.index = self._place(faiss.read_index(str(Path(folder) / "index.faiss")))
        self._set_search_knobs()

    def _set_search_knobs(self) -> None:
        """Apply nprobe / efSearch where the index family has them."""
        import faiss

        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        space.initialize(self.index)
        knobs = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
        for name, value in (("nprobe", self.options.nprobe), ("efSearch", self.options.ef_search)):
            if name in knobs:
                space.set_index_parameter(self.index, name, value)

    def _place(self, index):
        """Move a CPU index onto the run's GPU when the options and the installation allow."""
        import faiss

        self.on_gpu = False
        if not self._wants_gpu():
            return index
        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        cloner = faiss.GpuClonerOptions()
        cloner.useFloat16 = self.options.float16
        device = self.ctx.device.index if self.ctx.device.type == "cuda" and self.ctx.device.index is not None else 0
        try:
            placed = faiss.index_cpu_to_gpu(self._gpu_resources, device, index, cloner)
        except RuntimeError as exc:  # a family FAISS has no GPU version of (HNSW, flat SQfp16)
            if self.options.device == "gpu":
                raise RecipeError(f"index.device: gpu, but FAISS cannot place {type(index).__name__} there: {exc}")
            log.warning("FAISS cannot place %s on a GPU: searching it on the CPU", type(index).__name__)
            return index
        self.on_gpu = True
        return placed

    def _wants_gpu(self) -> bool:
        import faiss

        mode = self.options.device
        available = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if mode == "gpu" and not available:
            raise RecipeError("index.device: gpu, but FAISS sees no GPU (on a GPU machine: pip install 'jsarag[gpu]')")
        return mode == "gpu" or (mode == "auto" and available and self.ctx.device.type == "cuda")


@hookimpl
def register_indexes(register) -> None:
    register("faiss", FaissIndex)
