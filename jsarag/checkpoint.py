"""Checkpoints that are complete or absent: DeepSpeed's files plus each rank's loop state, written into a hidden
temporary folder that is renamed into place only when every rank has written its part, then recorded in ``latest``.

Layout: <output_dir>/checkpoints/step-0000100/{DeepSpeed files, loop_rank0.pt, ...} and checkpoints/latest.
A ``step-*`` folder only ever appears by rename, so every one is complete; ``.tmp-*`` (being written) and ``.old-*``
(being replaced or deleted) folders are never read and are removed by the next checkpoint.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import random
import re
import resource
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from jsarag.errors import TrainingError
from jsarag.faults import fault_point
from jsarag.files import atomic_write, fsync

log = logging.getLogger("jsarag.checkpoint")
TAG = re.compile(r"step-\d{7,}")  # tag_for's form; more digits past step 9,999,999
LOW_SPACE = 64 * 2**20  # bytes: below this a write error without an errno is taken for a full disk


def tag_for(step: int) -> str:
    """Return the folder name of the checkpoint at ``step``."""
    return f"step-{step:07d}"


def step_of(tag: str) -> int:
    """Return the step a checkpoint tag names."""
    return int(tag.removeprefix("step-"))


def complete_tags(root: Path) -> list[str]:
    """Return the tags of the complete checkpoints under ``root``, oldest step first."""
    found = [p.name for p in root.iterdir() if TAG.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=step_of)


def latest(root: Path) -> str | None:
    """Return the tag of the latest complete checkpoint under ``root``, if any.

    ``latest`` names it; when that folder is missing (or ``latest`` is, after a kill between the rename and the
    pointer write), the newest complete ``step-*`` folder is the latest.
    """
    pointer = root / "latest"
    tag = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    if tag is not None and not TAG.fullmatch(tag):
        raise TrainingError(f"{pointer} names '{tag[:60]}', which is not a checkpoint folder (step-NNNNNNN); delete "
                            f"{pointer} and the newest step-* folder in {root} will be used")
    if tag is not None and (root / tag).is_dir():
        return tag
    tags = complete_tags(root)
    if tag is not None:
        log.warning("%s names %s, which is missing: using %s", pointer, tag, tags[-1] if tags else "no checkpoint")
    return tags[-1] if tags else None


def find(root: Path, tag: str | None = None) -> str | None:
    """Return the tag of the complete checkpoint ``tag`` names under ``root`` (``step-0000040``, ``step-40`` or
    ``40``), else of the latest one (None: there is none); a tag that names none is a TrainingError listing those
    there are."""
    if tag is None:
        return latest(root)
    digits = tag.strip().removeprefix("step-")
    if digits.isdigit() and digits.isascii() and (root / tag_for(int(digits))).is_dir():
        return tag_for(int(digits))
    there = ", ".join(complete_tags(root)) or "none"
    raise TrainingError(f"--checkpoint {tag}: no complete checkpoint of that name in {root} (complete ones: {there})")


def save(engine: Any, root: Path, step: int, rank: int, loop_state: dict[str, Any]) -> Path:
    """Write a complete checkpoint for ``step`` (collective: every rank calls it).

    On a write error on any rank every rank raises the same TrainingError, the half-written folder is removed and
    the previous checkpoint is left as it was.
    """
    tag, hidden = tag_for(step), root / f".tmp-{tag_for(step)}"
    previous = latest(root)
    _agree(_prepare(root, hidden) if rank == 0 else None, root, tag, previous, hidden, rank)
    failure = _write(engine, hidden, rank, loop_state)
    fault_point("checkpoint_written")
    _agree(failure, root, tag, previous, hidden, rank)
    _agree(_publish(root, hidden, tag) if rank == 0 else None, root, tag, previous, hidden, rank)
    return root / tag


def _prepare(root: Path, hidden: Path) -> str | None:
    """Remove what killed checkpoints left behind and create the hidden folder (rank 0); return an error, if any."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".tmp-step-*"):
            shutil.rmtree(leftover)
        for leftover in root.glob(".old-step-*"):
            shutil.rmtree(leftover)
        hidden.mkdir()
    except OSError as exc:
        return describe_write_error(exc, root)
    return None


def _write(engine: Any, hidden: Path, rank: int, loop_state: dict[str, Any]) -> str | None:
    """Write DeepSpeed's files and this rank's loop state into ``hidden``; return the first write error, if any.

    The engine's checkpoint writer (jsarag.engine.GuardedCheckpointEngine) records a failed write instead of raising,
    so that every rank runs DeepSpeed's collectives to the end and none is left waiting in a barrier.
    """
    writer = engine.checkpoint_engine
    writer.failure = None
    try:
        # what trains only: the engine's module tree leaves frozen parameters out of its state dict (tied aliases
        # included), and DeepSpeed leaves them out of ZeRO's partitions; resuming rebuilds them from the base model
        engine.save_checkpoint(str(hidden.parent), tag=hidden.name, save_latest=False, exclude_frozen_parameters=True)
        failure = writer.failure
        if failure is None:
            atomic_write(hidden / f"loop_rank{rank}.pt", _to_bytes(loop_state))
    except OSError as exc:
        failure = f"{exc.filename or hidden}: {describe_write_error(exc, hidden)}"
    return failure


def _publish(root: Path, hidden: Path, tag: str) -> str | None:
    """Rename the written folder into place and point ``latest`` at it (rank 0); return an error, if any.

    A stale folder of the same name is renamed aside first and deleted last, so that a kill at any point leaves
    ``latest`` naming a complete folder (or a missing one, and ``latest()`` then takes the newest complete one).
    """
    target, aside = root / tag, root / f".old-{tag}"
    try:
        fsync(hidden)
        if target.exists():
            os.replace(target, aside)
        os.replace(hidden, target)
        fsync(root)
        fault_point("checkpoint_renamed")
        atomic_write(root / "latest", tag)
    except OSError as exc:
        return describe_write_error(exc, root)
    shutil.rmtree(aside, ignore_errors=True)
    return None


def _agree(error: str | None, root: Path, tag: str, previous: str | None, hidden: Path, rank: int) -> None:
    """Share every rank's error (collective); when any rank failed, clean up and raise the same error everywhere."""
    errors = _gather(error)
    if not errors:
        return
    if rank == 0:
        shutil.rmtree(hidden, ignore_errors=True)
    log.error("rank %d stops: checkpoint %s could not be written", rank, root / tag)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()  # every rank has said so before any exits (the launcher then kills the rest)
    intact = f"the previous checkpoint {root / previous} is intact" if previous else "there is no earlier checkpoint"
    raise TrainingError(f"could not write checkpoint {root / tag}: {'; '.join(errors)}; {intact}. Free disk space or "
                        f"fix the permissions of {root}, then run the same command again to resume")


def _gather(error: str | None) -> list[str]:
    """Every rank's error (ranks that succeeded left out), the same list on every rank (collective)."""
    everyone = [error]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, error)
    return [f"rank {rank}: {e}" if len(everyone) > 1 else e for rank, e in enumerate(everyone) if e]


def describe_write_error(exc: BaseException, folder: Path) -> str:
    """Say what a failed write into ``folder`` means: disk full, a file size limit, permission denied, or the error.

    torch.save's writer reports a short write without an errno, so for errors without one the likely causes are
    looked up: the process's file size limit (``ulimit -f``) and the free space of the file system.
    """
    code = getattr(exc, "errno", None)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied ({exc})"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full ({exc})"
    size_limit, free = resource.getrlimit(resource.RLIMIT_FSIZE)[0], _free_bytes(folder)
    if code is None and free is not None and free < LOW_SPACE:
        return f"disk full ({free} bytes free) ({exc})"
    if code == errno.EFBIG or (code is None and size_limit != resource.RLIM_INFINITY):
        return f"file size limit reached (ulimit -f: {size_limit} bytes) ({exc})"
    return str(exc)


def _free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of ``folder`` (or its nearest existing parent), if it can be read."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, by step, never the one ``latest`` names (rank 0).

    A folder is renamed aside before it is deleted, so that a kill mid-deletion leaves no partial ``step-*`` folder.
    """
    current = latest(root)
    for tag in complete_tags(root)[:-keep]:
        if tag == current:
            continue
        aside = root / f".old-{tag}"
        try:
            os.replace(root / tag, aside)
        except OSError as exc:
            log.warning("could not delete the old checkpoint %s: %s", root / tag, describe_write_error(exc, root))
            continue
        shutil.rmtree(aside, ignore_errors=True)


def load_loop_state(root: Path, tag: str, rank: int) -> dict[str, Any]:
    """Read this rank's loop state from a checkpoint (tensors and plain values only: weights_only)."""
    path = root / tag / f"loop_rank{rank}.pt"
    if not path.exists():
        raise TrainingError(f"{path} is missing: was the checkpoint written with a different number of ranks?")
    return load_file(path, "cpu")


def load_file(path: Path, map_location: Any = None, allowed: Sequence[type] = ()) -> Any:
    """torch.load with ``weights_only=True`` (tensors, plain values and the ``allowed`` classes); a file that pickles
    anything else, or is damaged, is a TrainingError naming it."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), str(exc).splitlines()[0])
        raise TrainingError(f"{path}: refused to load: it pickles more than tensors and plain values ({reason}); it "
                            f"was not written by this run or has been tampered with. Delete {path.parent} to resume "
                            "from the checkpoint before it") from None
    except (RuntimeError, EOFError) as exc:  # a truncated or corrupted zip archive
        raise TrainingError(f"{path}: cannot be read ({exc}); if the file is damaged, delete {path.parent} to resume "
                            "from the checkpoint before it") from None


def _to_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def rng_state() -> dict[str, Any]:
    """Capture the Python, NumPy, torch and (with a GPU) this rank's CUDA random states as loadable values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's: one per rank
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (a CUDA state only where there is a GPU to take it)."""
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(value: Any) -> Any:
    """torch.load gives lists where random.getstate had tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
