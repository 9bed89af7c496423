"""Passage embeddings and their index, built once per (knowledge base, passage encoder, vector type, index options)
and cached: the framework's side of ``Context.passage_index``.

The cache folder is keyed by a fingerprint of all four, so a changed KB or encoder gets a fresh build; a folder
whose recorded fingerprint disagrees with what the run expects is an error, never a silent wrong answer.

Embedding: the KB is cut into shards of ``shard_rows`` passages; every rank embeds a share of the unfinished shards
into one memory-mapped (P, d) ``vectors.npy`` (float16 by default, float32 by choice) inside a work folder
``.partial-<key>`` beside the target, and marks each shard done once its rows are on disk. A killed job leaves the
work folder; the next build of the same key re-embeds only the shards without a mark (a work folder made for other
settings is removed). Indexing: an index that shards (``Index.sharded``) is built by every rank over its own part,
any other by rank 0 alone while the other ranks wait by watching the folder, not in a collective, so a build longer
than the process group's timeout holds nobody past it; the waiters give up when rank 0's heartbeat file stops
changing for ``HEARTBEAT_STALE`` seconds or a rank leaves a failure note. The finished work folder is renamed into
place: nothing of a completed build is left behind. The same machinery re-embeds the KB when a trained passage
encoder asks for it (``live_step``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import numpy as np
from tqdm.auto import tqdm

from jsarag.errors import IndexMismatchError, JsaragError
from jsarag.faults import fault_point
from jsarag.files import atomic_write
from jsarag.paths import confined

if TYPE_CHECKING:
    from jsarag.api import Context, Index

log = logging.getLogger("jsarag.passages")
PROGRESS_SECONDS = 30  # off a terminal, a line about the embedding at least this often
Encode = Callable[[list[str]], np.ndarray]  # texts -> (n, d) vectors
VectorType = Literal["float16", "float32"]
SHARD_ROWS = 65_536  # passages per embedding shard: the unit a killed embedding job resumes from
POLL_SECONDS = 0.5  # how often a waiting rank looks at the build folder
HEARTBEAT_SECONDS = 10.0  # how often the building rank 0 touches its heartbeat file
HEARTBEAT_STALE = 600.0  # a waiting rank gives up after the heartbeat stood still this long


# -- the service: Context.passage_index ----------------------------------------------------------------------------

@dataclass
class PassageIndex:
    """The KB's passage vectors and a built index over them, ready to search."""

    index: Index  # the recipe's index component, loaded
    vectors: np.ndarray  # (P, d) float16 or float32, memory-mapped: read only the rows you need (``vectors_of``)
    folder: Path  # the build folder (vectors.npy, the index files, meta.json)
    meta: dict[str, Any]  # what the folder was built for: kb, encoder, index, vectors, passages, dim, step (live)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k), best first, for (B, d) float32 queries."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """(*rows.shape, d) float32 vectors of KB rows (-1 gives zeros), reading only those rows of the memmap."""
        flat = rows.reshape(-1)
        unique, inverse = np.unique(np.maximum(flat, 0), return_inverse=True)
        block = np.asarray(self.vectors[unique], dtype=np.float32)  # (U, d): only these rows are read
        out = block[inverse].reshape(*rows.shape, block.shape[1])
        out[rows < 0] = 0.0
        return out

    @property
    def step(self) -> int:
        """The optimizer step a live build was embedded at (0 for a cached build of the initial encoder)."""
        step = self.meta.get("step", 0)
        if not isinstance(step, int):
            raise IndexMismatchError(f"{self.folder}/meta.json records no step; delete the folder to re-embed the KB")
        return step


@dataclass(frozen=True)
class Embedding:
    """How the KB's vectors are written: their storage type and the shard size a killed job resumes from."""

    dtype: VectorType = "float16"
    shard_rows: int = SHARD_ROWS
    batch_size: int = 64


def passage_index(ctx: Context, encoder: str, encode: Encode, batch_size: int, live_step: int | None = None,
                  dtype: VectorType = "float16", shard_rows: int = SHARD_ROWS) -> PassageIndex:
    """Return the KB's vectors with the recipe's index over them, embedding and building them if needed.

    Without ``live_step`` the build is cached in the index folder by (KB, encoder, vector type, index options) and
    shared by every component of the run that asks for the same one. With ``live_step`` (a trained passage encoder)
    the KB is re-embedded now into ``<output_dir>/index-live/<role>``, replacing the previous live build. A
    collective.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"passage vectors are stored as float16 or float32, not {dtype!r}")
    plan = Embedding(dtype, shard_rows, batch_size)
    index = ctx.new_index()
    if live_step is not None:
        target = live_folder(ctx)
        expected = live_expected(ctx, encoder, index, dtype)
        build_folder(ctx, index, target, {**expected, "step": live_step}, encode, plan, replace=True)
        return load(ctx.new_index(), target, expected, len(ctx.kb))
    expected = {"kb": ctx.kb.fingerprint, "encoder": encoder, "index": index.fingerprint_options(), "vectors": dtype}
    target = index_dir(index.options.dir, ctx) / index_fingerprint(*expected.values())
    if target not in ctx.loaded:
        if ctx.broadcast(not (target / "meta.json").exists()):
            build_folder(ctx, index, target, expected, encode, plan)
            index = ctx.new_index()  # load afresh: the built instance (and its memory) is dropped
        ctx.loaded[target] = load(index, target, expected, len(ctx.kb))
    return ctx.loaded[target]


def live_passage_index(ctx: Context, encoder: str, dtype: VectorType = "float16") -> PassageIndex | None:
    """The role's last live build in the run's folder (``passage_index(..., live_step=N)``), if there is one."""
    if not ctx.broadcast((live_folder(ctx) / "meta.json").exists()):
        return None
    index = ctx.new_index()
    return load(index, live_folder(ctx), live_expected(ctx, encoder, index, dtype), len(ctx.kb))


def live_folder(ctx: Context) -> Path:
    """Where a trained passage encoder of this role re-embeds the KB."""
    return ctx.output_dir / "index-live" / ctx.role


def live_expected(ctx: Context, encoder: str, index: Index, dtype: VectorType) -> dict[str, str]:
    """What a live folder must have been built for: this KB, the role's encoder (trained from ``encoder``), index."""
    return {"kb": ctx.kb.fingerprint, "encoder": f"{encoder}+trained", "index": index.fingerprint_options(),
            "vectors": dtype}


def index_dir(option: str | Path | None, ctx: Context) -> Path:
    """Resolve an index's ``dir`` option (null, ``kb``, an absolute path or one relative to output_dir) to a folder."""
    if option is None:
        return ctx.cache_dir / "indexes"
    if str(option) != "kb":
        return confined(option, ctx.output_dir, "index.dir")
    beside = Path(ctx.kb.path).resolve().parent / ".jsarag-indexes"
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    log.warning("%s is not writable: caching the index in %s instead", beside, ctx.cache_dir / "indexes")
    return ctx.cache_dir / "indexes"


def index_fingerprint(*parts: str) -> str:
    """Return the cache key of an index: the KB content, the passage encoder, the vector type, the index options."""
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()[:20]


def work_folder(target: Path) -> Path:
    """The folder a build of ``target`` is embedded and indexed in, renamed to ``target`` when complete."""
    return target.with_name(f".partial-{target.name}")


# -- building -------------------------------------------------------------------------------------------------------

def build_folder(ctx: Context, index: Index, target: Path, meta: dict[str, Any], encode: Encode, plan: Embedding,
                 replace: bool = False) -> None:
    """Embed the KB with every rank and build ``index`` into ``target``, resuming a killed build; all ranks call this.

    Another job building the same folder right now (it holds the lock) is waited for instead."""
    work = work_folder(target)
    build_id = ctx.broadcast(uuid.uuid4().hex)
    if replace:
        def done() -> bool:
            return read_meta_or_none(target).get("build_id") == build_id
    else:
        def done() -> bool:
            return (target / "meta.json").exists()  # any complete build of this key will do
    with _build_lock(ctx, target, done) as mine:
        if mine:
            if ctx.rank == 0:
                once = "" if replace else f"; done once: later runs load it from {target}"
                log.info("preparing the passage index: embedding %d passages of %s with %s on %d rank(s)%s",
                         len(ctx.kb), ctx.kb.path, meta["encoder"], ctx.world_size, once)
            with _heartbeat(work if ctx.rank == 0 else None):
                started = time.perf_counter()
                reused = embed_shards(ctx, encode, work, meta, plan, check=index.check_vectors)
                embedded = time.perf_counter()
                _build_index(ctx, index, work)
            if ctx.rank == 0:
                vectors = _read_vectors(work)
                info = {**meta, "passages": int(vectors.shape[0]), "dim": int(vectors.shape[1]),
                        "shards": _shard_count(len(ctx.kb), plan.shard_rows), "shards_reused": reused,
                        "embed_seconds": round(embedded - started, 2),
                        "build_seconds": round(time.perf_counter() - embedded, 2), "world_size": ctx.world_size,
                        "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_id": build_id}
                del vectors
                _finish(work, target, info, replace)
        elif not done():
            log.info("another job is building %s: waiting for it", target)
        _await(done, work, f"the build of {target}")
    ctx.barrier()  # every rank is here already: this only keeps the ranks' next collectives in step


@contextlib.contextmanager
def _build_lock(ctx: Context, target: Path, done: Callable[[], bool]) -> Iterator[bool]:
    """Hold ``.<key>.lock`` beside the target on rank 0 while building; yield on every rank whether this job builds.

    It does not when another job holds the lock, or finished the build before the lock was free. The lock dies with
    its process, so a killed build's work folder is free to resume."""
    from filelock import FileLock, Timeout

    lock, path = None, target.with_name(f".{target.name}.lock")
    if ctx.rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
            if done():
                _release(lock, path)
                lock = None
        except Timeout:
            lock = None
    mine = ctx.broadcast(lock is not None if ctx.rank == 0 else None)
    try:
        yield mine
    finally:
        if lock is not None:
            _release(lock, path)


def _release(lock: Any, path: Path) -> None:
    """Remove the lock file, then release the lock (nobody blocks on it: a job that cannot take it at once waits for
    the build's files, and one that takes it checks first whether the build is done)."""
    path.unlink(missing_ok=True)
    lock.release()


@contextlib.contextmanager
def _heartbeat(work: Path | None) -> Iterator[None]:
    """Touch ``work/heartbeat`` every HEARTBEAT_SECONDS from a thread while the block runs (rank 0 only)."""
    if work is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):  # the folder is renamed into place at the end
                (work / "heartbeat").touch()

    thread = threading.Thread(target=beat, name="jsarag-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _await(done: Callable[[], bool], work: Path, what: str) -> None:
    """Poll until ``done()``; raise when a rank left a failure note in ``work`` or its heartbeat stood still."""
    last_beat, seen_at, started = None, time.monotonic(), time.monotonic()
    next_note = started + 60
    while not done():
        failures = sorted(work.glob("failed.*")) if work.is_dir() else []
        if failures:
            raise JsaragError(f"{what} failed: {failures[0].read_text(errors='replace').strip()}")
        beat = _mtime(work / "heartbeat")
        now = time.monotonic()
        if beat != last_beat:
            last_beat, seen_at = beat, now
        elif now - seen_at > HEARTBEAT_STALE:
            raise JsaragError(f"{what} stopped: {work}/heartbeat has not changed for {HEARTBEAT_STALE:.0f} s; run "
                              "again to resume it")
        if now > next_note:
            log.info("waiting for %s (%.0f s so far)", what, now - started)
            next_note = now + 60
        time.sleep(POLL_SECONDS)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _build_index(ctx: Context, index: Index, work: Path) -> None:
    """Build and save the index into ``work``: every rank its part of a sharded index, else rank 0 alone."""
    builds = index.sharded or ctx.rank == 0
    if builds:
        try:
            index.build(np.load(work / "vectors.npy", mmap_mode="r"))
            index.save(work)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                atomic_write(work / f"failed.{ctx.rank}", f"rank {ctx.rank}: {type(exc).__name__}: {exc}")
            raise
        atomic_write(work / f"built.{ctx.rank}", "")
    if ctx.rank == 0 and index.sharded:
        ranks = range(ctx.world_size)
        _await(lambda: all((work / f"built.{r}").exists() for r in ranks), work, f"the ranks' index parts in {work}")


def _finish(work: Path, target: Path, info: dict[str, Any], replace: bool) -> None:
    """Drop the work folder's bookkeeping, record meta.json and rename the folder into place (rank 0)."""
    shutil.rmtree(work / "shards", ignore_errors=True)
    for leftover in [work / "progress.json", work / "heartbeat", *work.glob("built.*")]:
        leftover.unlink(missing_ok=True)
    atomic_write(work / "meta.json", json.dumps(info, indent=2))
    old = target.with_name(f".old-{target.name}-{os.getpid()}")
    if replace and target.exists():
        os.replace(target, old)
    os.replace(work, target)  # the lock is ours: nobody else renames into target
    shutil.rmtree(old, ignore_errors=True)  # open memmaps of the old files stay valid until closed


# -- embedding ------------------------------------------------------------------------------------------------------

def _shard_count(n: int, shard_rows: int) -> int:
    return -(-n // shard_rows)


def embed_shards(ctx: Context, encode: Encode, work: Path, meta: dict[str, Any], plan: Embedding,
                 check: Callable[[int, int], None] | None = None) -> int:
    """Embed the KB's unfinished shards into ``work/vectors.npy``, the ranks taking turns; return the shards reused.

    All ranks call this. Every rank makes the same number of ``encode`` calls of the same sizes (a rank short of
    work re-encodes rows of a shard in its group), so an encoder partitioned by ZeRO-3 may be used. ``check(P, d)``
    runs on every rank once the first batch gives the vector size, before anything is written (an index that cannot
    hold the vectors fails at once, leaving nothing behind).
    """
    n = len(ctx.kb)
    progress = {"passages": n, "dtype": plan.dtype, "shard_rows": plan.shard_rows, "for": meta}
    state = ctx.broadcast(_resume_state(work, progress) if ctx.rank == 0 else None)
    done = set(state["done"])
    pending = [s for s in range(_shard_count(n, plan.shard_rows)) if s not in done]
    if done:
        log.info("resuming the embedding in %s: %d of %d shards are done", work, len(done), len(done) + len(pending))
    vectors = None
    if state["dim"] is not None and pending:
        if check is not None:
            check(n, state["dim"])
        vectors = np.lib.format.open_memmap(work / "vectors.npy", mode="r+")
    world = ctx.world_size
    total = sum(b - a for a, b in (_rows(s, n, plan.shard_rows) for s in pending))
    bar = tqdm(total=total, unit="passage", desc="embedding passages", mininterval=2,
               disable=ctx.rank != 0 or not pending or not sys.stderr.isatty())  # off a terminal: log lines (below)
    started = logged = time.perf_counter()
    done_rows = 0  # of total, by all ranks (tqdm counts nothing when it is off)
    for group_start in range(0, len(pending), world):
        group = [_rows(s, n, plan.shard_rows) for s in pending[group_start : group_start + world]]
        mine = ctx.rank < len(group)
        lo, hi = group[ctx.rank if mine else 0]
        length = max(b - a for a, b in group)
        for start in range(0, length, plan.batch_size):
            count = min(plan.batch_size, length - start)
            rows = [min(lo + start + i, hi - 1) for i in range(count)]
            block = np.asarray(encode(ctx.kb.render_many(rows)), dtype=np.float32)  # (count, d)
            if vectors is None:
                if check is not None:
                    check(n, block.shape[1])
                vectors = _create_vectors(ctx, work, progress, (n, block.shape[1]), plan.dtype)
            keep = max(0, min(count, hi - lo - start))
            if mine and keep:
                vectors[lo + start : lo + start + keep] = block[:keep]
            written = sum(max(0, min(count, b - a - start)) for a, b in group)  # rows written by all ranks
            bar.update(written)
            done_rows, now = done_rows + written, time.perf_counter()
            due = logged == started or bar.disable and now - logged >= PROGRESS_SECONDS  # the first batch's estimate
            if ctx.rank == 0 and due and 0 < done_rows < total:
                left = (now - started) / done_rows * (total - done_rows)
                log.info("embedded %d of %d passages; about %s left", done_rows, total, _duration(left))
                logged = now
        if mine:
            vectors.flush()  # the rows are on disk before the mark says so
            atomic_write(work / "shards" / str(pending[group_start + ctx.rank]), "")
            fault_point("embed_shard")
    bar.close()
    ctx.barrier()
    return len(done)


def _duration(seconds: float) -> str:
    """A time estimate in words: 40 s, 3 min, 1.5 h."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _rows(shard: int, n: int, shard_rows: int) -> tuple[int, int]:
    return shard * shard_rows, min(n, (shard + 1) * shard_rows)


def _resume_state(work: Path, progress: dict[str, Any]) -> dict[str, Any]:
    """What a work folder left by a killed build holds for these settings: its vector size and finished shards.

    A work folder of other settings (another KB, encoder, step, vector type or shard size) is removed (rank 0)."""
    try:
        recorded = json.loads((work / "progress.json").read_text())
        vectors = np.load(work / "vectors.npy", mmap_mode="r")
        same = {k: v for k, v in recorded.items() if k != "dim"} == json.loads(json.dumps(progress))
        if same and vectors.shape == (progress["passages"], recorded["dim"]) and vectors.dtype == progress["dtype"]:
            for note in [*work.glob("failed.*"), *work.glob("built.*")]:
                note.unlink()
            done = sorted(int(p.name) for p in (work / "shards").glob("*") if p.name.isdigit())
            return {"dim": int(recorded["dim"]), "done": done}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if work.exists():
        log.info("removing %s (an unfinished build for other settings)", work)
        shutil.rmtree(work, ignore_errors=True)
    for leftover in work.parent.glob(f".tmp-{work.name.removeprefix('.partial-')}-*"):  # older jsarag's builds
        shutil.rmtree(leftover, ignore_errors=True)
    return {"dim": None, "done": []}


def _create_vectors(ctx: Context, work: Path, progress: dict[str, Any], shape: tuple[int, int],
                    dtype: VectorType) -> np.memmap:
    """Rank 0 creates the (P, d) file and records the settings; every rank then opens it for writing its rows."""
    if ctx.rank == 0:
        (work / "shards").mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(work / "vectors.npy", mode="w+", dtype=dtype, shape=shape).flush()
        atomic_write(work / "progress.json", json.dumps({**progress, "dim": shape[1]}, indent=1))
    ctx.barrier()
    return np.lib.format.open_memmap(work / "vectors.npy", mode="r+")


# -- loading --------------------------------------------------------------------------------------------------------

def load(index: Index, target: Path, expected: dict[str, str], n_passages: int) -> PassageIndex:
    """Load a built index folder after checking it was built for this KB, encoder, vector type and index."""
    meta = read_meta(target)
    for what, value in expected.items():
        if meta.get(what) != value:
            raise IndexMismatchError(
                f"{target}: index built for another {what} (recorded {meta.get(what)}, this run has {value}); "
                "delete the folder or point index.dir elsewhere to rebuild"
            )
    vectors = _read_vectors(target)
    if vectors.shape[0] != n_passages:
        raise IndexMismatchError(f"{target}: {vectors.shape[0]} vectors for a KB of {n_passages} passages")
    index.load(target)
    if index.ntotal != n_passages:
        raise IndexMismatchError(f"{target}: the index holds {index.ntotal} passages, the KB {n_passages}")
    log.info("loaded index %s (%d passages, dim %d)", target, vectors.shape[0], vectors.shape[1])
    return PassageIndex(index=index, vectors=vectors, folder=target, meta=meta)


def read_meta(folder: Path) -> dict[str, Any]:
    """The ``meta.json`` of a built index folder; a missing or unreadable one is an IndexMismatchError."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexMismatchError(f"{folder}: no meta.json, not a built index folder") from None
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise IndexMismatchError(f"{folder}/meta.json is corrupt ({err}); delete the folder to rebuild the "
                                 "index") from None
    if not isinstance(meta, dict):
        raise IndexMismatchError(f"{folder}/meta.json is not a JSON object; delete the folder to rebuild the index")
    return meta


def read_meta_or_none(folder: Path) -> dict[str, Any]:
    """``read_meta``, or an empty dict while the folder is not (yet) a built one."""
    try:
        return read_meta(folder)
    except IndexMismatchError:
        return {}


def _read_vectors(folder: Path) -> np.ndarray:
    """The memory-mapped (P, d) ``vectors.npy`` of a built index folder; a missing or corrupt one is an
    IndexMismatchError."""
    try:
        vectors = np.load(Path(folder) / "vectors.npy", mmap_mode="r")
    except FileNotFoundError:
        raise IndexMismatchError(f"{folder}: no vectors.npy (an incomplete build); delete the folder to rebuild "
                                 "the index") from None
    except (OSError, ValueError) as err:
        raise IndexMismatchError(f"{folder}/vectors.npy is corrupt ({err}); delete the folder to rebuild the "
                                 "index") from None
    if vectors.ndim != 2:
        raise IndexMismatchError(f"{folder}/vectors.npy holds a {vectors.ndim}-d array, not (passages, dim); delete "
                                 "the folder to rebuild the index")
    return vectors


# -- inspection (jsarag index info) ---------------------------------------------------------------------------------

def describe(folder: Path) -> dict[str, Any]:
    """The recorded fingerprint of a built index folder with its sizes on disk (bytes, by file)."""
    folder = Path(folder)
    meta = read_meta(folder)
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    return {"folder": str(folder), "key": folder.name, **meta, "files": files, "bytes": sum(files.values())}


def cached_folders(folder: Path) -> list[Path]:
    """Built index folders (with a meta.json) under a cache folder, newest first."""
    found = [p for p in Path(folder).glob("*/meta.json") if not p.parent.name.startswith(".")]
    return [p.parent for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]
