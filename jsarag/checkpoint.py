"""Checkpoints that are complete or absent: DeepSpeed's files plus each rank's loop state, written into a hidden
temporary folder that is renamed into place only when every rank has finished, then recorded in ``latest``.

Layout: <output_dir>/checkpoints/step-0000100/{DeepSpeed files, loop_rank0.pt, ...} and checkpoints/latest.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jsarag.errors import TrainingError


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file so readers see the old content or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tag_for(step: int) -> str:
    """Return the folder name of the checkpoint at ``step``."""
    return f"step-{step:07d}"


def latest(root: Path) -> str | None:
    """Return the tag of the latest complete checkpoint under ``root``, if any."""
    pointer = root / "latest"
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    if not (root / tag).is_dir():
        raise TrainingError(f"{pointer} names {tag}, which is missing; delete {pointer} to start afresh")
    return tag


def save(engine: Any, root: Path, step: int, rank: int, loop_state: dict[str, Any], barrier) -> Path:
    """Write a complete checkpoint for ``step`` (collective: every rank calls it)."""
    tag, tmp_tag = tag_for(step), f".tmp-{tag_for(step)}"
    if rank == 0:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    barrier()
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
        buffer = _to_bytes(loop_state)
        atomic_write(root / tmp_tag / f"loop_rank{rank}.pt", buffer)
    except OSError as exc:
        raise TrainingError(f"could not write checkpoint {root / tag} ({exc}); the previous checkpoint is intact") from exc
    barrier()
    if rank == 0:
        shutil.rmtree(root / tag, ignore_errors=True)
        os.replace(root / tmp_tag, root / tag)
        atomic_write(root / "latest", tag)
    barrier()
    return root / tag


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (rank 0 only)."""
    tags = sorted(p.name for p in root.glob("step-*") if p.is_dir())
    for tag in tags[:-keep]:
        shutil.rmtree(root / tag, ignore_errors=True)


def load_loop_state(root: Path, tag: str, rank: int) -> dict[str, Any]:
    """Read this rank's loop state from a checkpoint (tensors and plain values only: weights_only)."""
    path = root / tag / f"loop_rank{rank}.pt"
    if not path.exists():
        raise TrainingError(f"{path} is missing: was the checkpoint written with a different number of ranks?")
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def rng_state() -> dict[str, Any]:
    """Capture the Python, NumPy and torch random states as loadable values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])


def _tuples(value: Any) -> Any:
    """torch.load gives lists where random.getstate had tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
