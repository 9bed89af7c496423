"""Index ``faiss``: the FAISS family over unit-normalised passage vectors (inner product = cosine).

``type`` picks ``flat`` (exact), ``ivf`` (inverted lists), ``hnsw`` (graph) or ``ivfpq`` (inverted lists with
product-quantised codes); ``factory`` takes any raw ``faiss.index_factory`` string instead. IVF and PQ quantisers
are trained on a seeded sample of the vectors sized by FAISS's guidance (64 points per IVF list, never fewer than
39, and 39 per PQ centroid); vectors are added in chunks read from the memory-mapped matrix. On the CPU a built index
is read memory-mapped (``IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY``: pages come from the page cache, shared by the ranks
of a machine). With faiss-gpu and a GPU the index is placed on the run's GPU; ``device: gpu`` on an index FAISS
cannot place there is a RecipeError before the KB is embedded. ``shard: true`` gives each rank its own index over
1/world of the vectors and merges the ranks' top-k exactly (a collective, as ``torch_exact``). ``nprobe`` and
``ef_search`` are search-time knobs: they are not part of the cache key, so they can be changed on a built index
(``index.nprobe=64``).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from jsarag.api import Context, Index, IndexMismatchError, IndexOptions, RecipeError, hookimpl
from jsarag_plugins.indexes.shards import shard_range, sharded_search

log = logging.getLogger("jsarag.faiss")
MIN_POINTS = 39  # FAISS warns below 39 training points per k-means centroid
POINTS_PER_LIST = 64  # the default training sample per IVF list (FAISS: 30 to 256; it subsamples above 256)
GPU_PQ_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)  # faiss-gpu's IVF-PQ code sizes (8 bits)
GPU_PQ_SUB_DIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)  # dimensions per sub-quantiser it scans
GPU_SHARED_MEMORY = 48 * 1024  # bytes of lookup table per block: more needs float16 tables
TRAINED = ("ivf", "ivfpq", "hnsw")  # types whose index is more than the vectors (a sharded one caches its parts)


class FaissOptions(IndexOptions):
    type: Literal["flat", "ivf", "hnsw", "ivfpq"] = "flat"
    """Index family: flat (exact), ivf, hnsw or ivfpq (approximate)."""
    factory: str | None = None
    """A raw faiss.index_factory string (e.g. "OPQ64,IVF4096,PQ64"); overrides type and its options."""
    float16: bool = False
    """Store vectors as float16 (flat/ivf/hnsw: SQfp16 codes; on a GPU: float16 storage and lookup tables)."""
    nlist: int | None = Field(None, ge=1)
    """IVF inverted lists (null = 4·sqrt(P), at most P/39 so that every list gets FAISS's minimum of 39 training
    points; P per rank with shard)."""
    pq_m: int | None = Field(None, ge=1)
    """PQ sub-quantisers (bytes per code at 8 bits), must divide the dimension (null = the largest code size
    faiss-gpu supports that divides d into sub-vectors of 4 to 32 dimensions it scans: 96 for d = 384 or 768)."""
    pq_bits: int = Field(8, ge=1, le=16)
    """Bits per PQ code (faiss-gpu: 8; lowered on small KBs so that every code gets 39 training points)."""
    hnsw_m: int = Field(32, ge=2)
    """HNSW neighbours per node."""
    ef_construction: int = Field(80, ge=1)
    """HNSW efConstruction (build-time beam)."""
    train_sample: int | None = Field(None, ge=1)
    """Vectors sampled (seeded) to train IVF/PQ quantisers (null = 64 per IVF list and at least 39 per PQ
    centroid, at most P); fewer than 39 per IVF list is an error."""
    nprobe: int = Field(16, ge=1)
    """IVF lists visited per query (search time)."""
    ef_search: int = Field(64, ge=1)
    """HNSW efSearch (search time)."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """auto: the run's GPU when faiss-gpu is installed and the run has one; gpu: required (an index FAISS cannot
    place there is an error before the KB is embedded); cpu: never."""
    shard: bool = False
    """Each rank holds and searches 1/world of the vectors and the ranks' top-k are merged exactly by all-gather
    (search becomes a collective). ivf/ivfpq/hnsw parts are built per rank at the first load with that many ranks
    and cached in the index folder; flat parts are cut from vectors.npy at load."""
    mmap: bool = True
    """Read a built CPU index memory-mapped (pages on demand, shared by the ranks of a machine); false: into RAM."""
    add_batch_size: int = Field(65_536, ge=1)
    """Vectors added per chunk (bounds the RAM used to read the memory-mapped matrix)."""
    threads: int = Field(0, ge=0)
    """FAISS OpenMP threads (0 = FAISS's default)."""


class FaissIndex(Index):
    """A FAISS index over unit-normalised passage vectors, whole on every rank or sharded across them."""

    Options = FaissOptions

    def __init__(self, options: FaissOptions, ctx: Context) -> None:
        super().__init__(options, ctx)
        import faiss

        self.sharded = options.shard  # an option: set on the instance (Index.sharded)
        self.index: faiss.Index | None = None
        self.on_gpu = False
        self.offset = 0  # KB row of this rank's first passage (sharded)
        self.total = 0  # passages across all ranks
        self._gpu_resources = None
        if options.threads:
            faiss.omp_set_num_threads(options.threads)

    @property
    def ntotal(self) -> int:
        """Passages indexed (across all ranks when sharded)."""
        return self.total

    def fingerprint_options(self) -> str:
        """Return the options that change what is built (part of the cache key; search knobs and mmap are not;
        shard is, since a sharded build saves per-rank parts instead of one index file)."""
        o = self.options
        sample = f"sample={o.train_sample or 'auto'}"
        shard = [":shard"] if o.shard else []
        if o.factory:
            return "".join([f"faiss:factory={o.factory}:{sample}", *shard])
        parts = {"flat": [], "ivf": [o.nlist], "hnsw": [o.hnsw_m, o.ef_construction],
                 "ivfpq": [o.nlist, o.pq_m, o.pq_bits]}[o.type]
        fp16 = ["fp16"] if o.float16 and o.type != "ivfpq" else []
        return ":".join(["faiss", o.type, *map(str, parts), *fp16, *([sample] if o.type in ("ivf", "ivfpq") else []),
                         *(["shard"] if o.shard else [])])

    # -- the checks before embedding -----------------------------------------------------------------------------

    def check_vectors(self, count: int, dim: int) -> None:
        """Refuse, naming the option: a PQ size that does not divide d, IVF lists without 39 training points each,
        and ``device: gpu`` for an index FAISS cannot place on a GPU."""
        o, n = self.options, self._part_size(count)
        if o.type == "ivfpq" and not o.factory and dim % self.pq_m(dim):
            raise RecipeError(f"index.pq_m: {self.pq_m(dim)} does not divide the vector dimension {dim} of the "
                              "retriever's passage vectors; pick a divisor")
        if o.type in ("ivf", "ivfpq") and not o.factory:
            nlist, where = self.nlist(n), "each rank's part" if o.shard else "the KB"
            if o.nlist and MIN_POINTS * nlist > n:
                raise RecipeError(f"index.nlist: {nlist} lists need {MIN_POINTS} training vectors each "
                                  f"({MIN_POINTS * nlist:,}), and {where} has {n:,}; lower it or leave it null")
            if o.train_sample and MIN_POINTS * nlist > min(n, o.train_sample):
                raise RecipeError(f"index.train_sample: {o.train_sample:,} vectors train {nlist} IVF lists, fewer "
                                  f"than FAISS's {MIN_POINTS} a list; raise it to {MIN_POINTS * nlist:,} or leave it null")
        if o.device == "gpu":
            self._check_gpu(n, dim)

    def _check_gpu(self, n: int, dim: int) -> None:
        """Refuse ``device: gpu`` where FAISS has no GPU, no GPU version of the index, or refuses its PQ settings."""
        import faiss

        o = self.options
        if o.type == "hnsw" and not o.factory:
            raise RecipeError("index.device: gpu, but FAISS has no GPU HNSW; use type flat, ivf or ivfpq on the GPU, "
                              "or device: cpu (or auto) for hnsw")
        if o.type == "ivfpq" and not o.factory:
            m, bits = self.pq_m(dim), self.pq_bits(n)
            if m not in GPU_PQ_BYTES:
                raise RecipeError(f"index.pq_m: {m} sub-quantisers ({m}-byte codes) cannot go to the GPU "
                                  f"(index.device: gpu); faiss-gpu's IVF-PQ takes {', '.join(map(str, GPU_PQ_BYTES))}")
            if bits != 8:
                raise RecipeError(f"index.pq_bits: faiss-gpu's IVF-PQ needs 8-bit codes (index.device: gpu), and this "
                                  f"index would use {bits} (set {o.pq_bits}; fewer when the training sample is too "
                                  "small for 39 points a code)")
        if not _gpu_available():
            raise RecipeError("index.device: gpu, but FAISS sees no GPU (on a GPU machine: pip install 'jsarag[gpu]')")
        try:  # and ask FAISS itself, with the empty index this build would make
            empty = faiss.index_factory(dim, self.factory_string(n, dim), faiss.METRIC_INNER_PRODUCT)
            faiss.index_cpu_to_gpu(self._resources(), self._gpu_number(), empty, self._cloner(empty))
        except RuntimeError as exc:
            raise RecipeError(f"index.device: gpu, but FAISS cannot place {self.factory_string(n, dim)} on a GPU: "
                              f"{str(exc).strip().splitlines()[-1]}; change the index or use device: cpu") from None

    # -- the FAISS parameters ------------------------------------------------------------------------------------

    def nlist(self, n: int) -> int:
        """IVF lists for n vectors: the option, else 4·sqrt(n) capped at n/39 (every list gets 39 points)."""
        return self.options.nlist or max(1, min(int(4 * math.sqrt(n)), n // MIN_POINTS))

    def pq_m(self, d: int) -> int:
        """PQ sub-quantisers: the option, else the largest GPU code size cutting d into 4-32 dimensional pieces."""
        if self.options.pq_m:
            return self.options.pq_m
        fits = [m for m in GPU_PQ_BYTES if d % m == 0 and 4 <= d // m and d // m in GPU_PQ_SUB_DIMS]
        return max(fits) if fits else max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)

    def train_size(self, n: int) -> int:
        """Vectors the quantisers train on: the option, else 64 per IVF list and 39 per PQ centroid, at most n."""
        o = self.options
        if o.train_sample:
            return min(n, o.train_sample)
        pq = MIN_POINTS * 2 ** o.pq_bits if o.type == "ivfpq" else 0
        return min(n, max(POINTS_PER_LIST * self.nlist(n), pq))

    def pq_bits(self, n: int) -> int:
        """Bits per PQ code: the option, lowered until each of the 2**bits centroids gets 39 training points."""
        return min(self.options.pq_bits, max(1, int(math.log2(max(2, self.train_size(n) // MIN_POINTS)))))

    def factory_string(self, n: int, d: int) -> str:
        """The faiss.index_factory string for n vectors of dimension d."""
        o = self.options
        if o.factory:
            return o.factory
        codes = "SQfp16" if o.float16 else "Flat"
        if o.type == "flat":
            return codes
        if o.type == "ivf":
            return f"IVF{self.nlist(n)},{codes}"
        if o.type == "hnsw":
            return f"HNSW{o.hnsw_m}" + (",SQfp16" if o.float16 else "")
        m = self.pq_m(d)
        if d % m:
            raise RecipeError(f"index.pq_m: {m} does not divide the vector dimension {d}")
        return f"IVF{self.nlist(n)},PQ{m}x{self.pq_bits(n)}np"  # np: no polysemous training (slow, and unused here)

    # -- build, save, load -----------------------------------------------------------------------------------------

    def _part(self, n: int) -> tuple[int, int]:
        """Rows [lo, hi) this instance indexes: this rank's share when sharded, else all."""
        return shard_range(n, self.ctx.rank, self.ctx.world_size) if self.sharded else (0, n)

    def _part_size(self, n: int) -> int:
        lo, hi = self._part(n)
        return hi - lo

    def build(self, vectors: np.ndarray) -> None:
        """Build the index over (P, d) vectors (this rank's rows when sharded; a memmap is read in chunks)."""
        import faiss

        lo, hi = self._part(len(vectors))
        part = vectors[lo:hi]
        n, d = part.shape
        spec = self.factory_string(n, d)
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        if self.options.type == "hnsw" and not self.options.factory:
            faiss.downcast_index(index).hnsw.efConstruction = self.options.ef_construction
        self.index = self._place(index)
        if not self.index.is_trained:
            self.index.train(self._training_sample(part))
        chunks = range(0, n, self.options.add_batch_size)
        for start in tqdm(chunks, desc=f"indexing ({spec})", unit="chunk", disable=len(chunks) < 4, mininterval=2):
            self.index.add(np.ascontiguousarray(part[start : start + self.options.add_batch_size], np.float32))
        self.offset, self.total = lo, len(vectors)
        self._set_search_knobs()
        log.info("built faiss index %s over %d vectors%s", spec, n, " on the GPU" if self.on_gpu else "")

    def _training_sample(self, vectors: np.ndarray) -> np.ndarray:
        """(S, d) seeded sample of the vectors, read row by row from the memmap in sorted order."""
        n, size = len(vectors), self.train_size(len(vectors))
        if n <= size:
            return np.ascontiguousarray(vectors, np.float32)
        rows = np.sort(np.random.default_rng(0).choice(n, size, replace=False))
        return np.ascontiguousarray(vectors[rows], np.float32)

    def save(self, folder: Path) -> None:
        """Write the index into ``folder`` (a sharded flat index writes nothing: its parts are cut at load)."""
        import faiss

        if self.sharded and self._cut_at_load():
            return
        cpu = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        path = self._file(Path(folder))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        faiss.write_index(cpu, str(tmp))
        os.replace(tmp, path)

    def load(self, folder: Path) -> None:
        """Read the index from ``folder`` (memory-mapped on the CPU, onto the GPU when placed there); a sharded part
        of a trained type is built and cached at the first load with this number of ranks."""
        folder = Path(folder)
        vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        if self.sharded and (self._cut_at_load() or not self._file(folder).exists()):
            self.build(vectors)
            if self._cut_at_load():
                return
            self.save(folder)
            log.info("cached this rank's part of the index in %s", self._file(folder))
        index = self._read(self._file(folder))
        lo, hi = self._part(len(vectors))
        if index.ntotal != hi - lo:
            raise IndexMismatchError(f"{self._file(folder)} holds {index.ntotal} vectors, not the {hi - lo} of "
                                     f"{'this rank' if self.sharded else 'the KB'}; delete the folder to rebuild it")
        self.index = self._place(index)
        self.offset, self.total = lo, len(vectors)
        self._set_search_knobs()

    def _cut_at_load(self) -> bool:
        """Whether this index is only its vectors (flat), so a sharded part is cheaper cut from vectors.npy."""
        return self.options.type == "flat" and not self.options.factory

    def _file(self, folder: Path) -> Path:
        """The index file: ``index.faiss``, or this rank's part ``index.<rank>-of-<world>.faiss`` when sharded."""
        if not self.sharded:
            return folder / "index.faiss"
        return folder / f"index.{self.ctx.rank}-of-{self.ctx.world_size}.faiss"

    def _read(self, path: Path):
        """Read an index file, memory-mapped and read-only unless ``mmap: false``."""
        import faiss

        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if self.options.mmap else 0
        return faiss.read_index(str(path), flags)

    # -- search ------------------------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, rows), each (B, k), best first; a collective when sharded across several ranks."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not self.sharded:
            return self.index.search(queries, k)
        mine = torch.from_numpy(queries).to(self.ctx.device)  # gathered on the run's device (NCCL needs the GPU)
        return sharded_search(mine, k, self._local_top, self.ctx.rank, self.ctx.world_size)

    def _local_top(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, k) scores and KB rows of this rank's part (-1 rows, lowest scores where it has fewer than k)."""
        scores, rows = self.index.search(np.ascontiguousarray(queries.cpu().numpy()), k)
        rows = np.where(rows >= 0, rows + self.offset, -1)
        return torch.from_numpy(scores).to(queries.device), torch.from_numpy(rows).to(queries.device)

    def _set_search_knobs(self) -> None:
        """Apply nprobe / efSearch where the index family has them."""
        import faiss

        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        space.initialize(self.index)
        knobs = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
        for name, value in (("nprobe", self.options.nprobe), ("efSearch", self.options.ef_search)):
            if name in knobs:
                space.set_index_parameter(self.index, name, value)

    # -- GPU placement -----------------------------------------------------------------------------------------------

    def _place(self, index):
        """Move a CPU index onto the run's GPU when the options and the installation allow."""
        import faiss

        self.on_gpu = False
        if not self._wants_gpu():
            return index
        try:
            placed = faiss.index_cpu_to_gpu(self._resources(), self._gpu_number(), index, self._cloner(index))
        except RuntimeError as exc:  # a family FAISS has no GPU version of (HNSW)
            if self.options.device == "gpu":
                raise RecipeError(f"index.device: gpu, but FAISS cannot place {type(index).__name__} there: {exc}")
            log.warning("FAISS cannot place %s on a GPU: searching it on the CPU", type(index).__name__)
            return index
        self.on_gpu = True
        return placed

    def _cloner(self, index):
        """GPU cloner options: float16 storage/tables when asked, and float16 PQ tables when float32 ones do not fit."""
        import faiss

        cloner = faiss.GpuClonerOptions()
        ivf = faiss.try_extract_index_ivf(index)
        ivf = faiss.downcast_index(ivf) if ivf is not None else None
        pq = ivf.pq if isinstance(ivf, faiss.IndexIVFPQ) else None
        large_tables = pq is not None and 4 * pq.M * 2 ** pq.nbits > GPU_SHARED_MEMORY
        cloner.useFloat16 = self.options.float16 or large_tables
        return cloner

    def _resources(self):
        import faiss

        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        return self._gpu_resources

    def _gpu_number(self) -> int:
        device = self.ctx.device
        return device.index if device.type == "cuda" and device.index is not None else 0

    def _wants_gpu(self) -> bool:
        mode = self.options.device
        if mode == "gpu" and not _gpu_available():
            raise RecipeError("index.device: gpu, but FAISS sees no GPU (on a GPU machine: pip install 'jsarag[gpu]')")
        return mode == "gpu" or (mode == "auto" and self.ctx.device.type == "cuda" and _gpu_available())


def _gpu_available() -> bool:
    """Whether this FAISS build has GPU support and sees a GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@hookimpl
def register_indexes(register) -> None:
    register("faiss", FaissIndex)
