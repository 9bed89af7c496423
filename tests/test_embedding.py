"""Embedding a KB into the index cache: float16 or float32 vectors written in shards; a killed job (SIGKILL) resumes
from its finished shards and leaves nothing behind; another job's build in progress is waited for, not redone; the
wait for a build ends on a rank's failure note or a stopped heartbeat, not in a collective."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from conftest import REPO, child_env
from jsarag import passages
from jsarag.api import Context
from jsarag.errors import JsaragError
from jsarag.passages import index_fingerprint, read_meta, work_folder
from jsarag_plugins.indexes.torch_exact import TorchExactIndex, TorchExactOptions
from torch_exact_shards import PASSAGES, FakeKB, hashed_vectors

SHARD_ROWS = 16  # 101 passages: 7 shards, the last of 5


def _ctx(folder: Path) -> Context:
    ctx = Context(role="prior", kb=FakeKB(), output_dir=folder, cache_dir=folder, device=torch.device("cpu"))
    ctx.new_index = lambda: TorchExactIndex(TorchExactOptions(dir=folder / "indexes"), ctx)
    return ctx


class Counting:
    """An encoder that counts the texts it embeds."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.rows += len(texts)
        return hashed_vectors(texts)


KILLED = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_embedding import _ctx, SHARD_ROWS
from torch_exact_shards import hashed_vectors
_ctx(Path({folder!r})).passage_index("hashed-v1", hashed_vectors, batch_size=8, shard_rows=SHARD_ROWS)
"""


def test_a_killed_embedding_resumes_from_its_finished_shards(tmp_path):
    env = child_env(JSARAG_FAULT="embed_shard:3", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", KILLED.format(tests=str(REPO / "tests"), folder=str(tmp_path))],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == -9, done.stdout + done.stderr  # SIGKILLed at its third finished shard
    (work,) = (tmp_path / "indexes").glob(".partial-*")
    assert sorted(p.name for p in (work / "shards").iterdir()) == ["0", "1", "2"]
    assert not list((tmp_path / "indexes").glob("[!.]*"))  # no build published

    encoder = Counting()
    built = _ctx(tmp_path).passage_index("hashed-v1", encoder, batch_size=8, shard_rows=SHARD_ROWS)
    assert encoder.rows == PASSAGES - 3 * SHARD_ROWS  # only the 4 unfinished shards (53 rows) were embedded
    assert built.meta["shards"] == 7 and built.meta["shards_reused"] == 3
    clean = _ctx(tmp_path / "clean").passage_index("hashed-v1", hashed_vectors, batch_size=8, shard_rows=SHARD_ROWS)
    np.testing.assert_array_equal(np.asarray(built.vectors), np.asarray(clean.vectors))
    assert sorted(p.name for p in (tmp_path / "indexes").iterdir()) == [built.folder.name]  # nothing else is left
    assert sorted(p.name for p in built.folder.iterdir()) == ["meta.json", "vectors.npy"]


def test_vectors_are_float16_by_default_and_float32_by_choice(tmp_path):
    half = _ctx(tmp_path).passage_index("hashed-v1", hashed_vectors, batch_size=8, shard_rows=SHARD_ROWS)
    full = _ctx(tmp_path).passage_index("hashed-v1", hashed_vectors, batch_size=8, dtype="float32")
    assert half.vectors.dtype == np.float16 and full.vectors.dtype == np.float32
    assert half.folder != full.folder and read_meta(full.folder)["vectors"] == "float32"  # a cache key each
    expected = hashed_vectors([FakeKB().render(r) for r in range(PASSAGES)])
    np.testing.assert_array_equal(np.asarray(full.vectors), expected)
    np.testing.assert_allclose(np.asarray(half.vectors, np.float32), expected, atol=1e-3)


def test_a_work_folder_for_other_settings_is_started_afresh(tmp_path):
    ctx = _ctx(tmp_path)
    expected = {"kb": ctx.kb.fingerprint, "encoder": "hashed-v1", "index": "torch_exact", "vectors": "float16"}
    work = work_folder(tmp_path / "indexes" / index_fingerprint(*expected.values()))
    (work / "shards").mkdir(parents=True)
    np.save(work / "vectors.npy", np.zeros((PASSAGES, 16), np.float16))
    (work / "progress.json").write_text(json.dumps({"passages": PASSAGES, "dtype": "float16", "shard_rows": 8,
                                                    "for": expected, "dim": 16}))  # another shard size
    for shard in range(13):
        (work / "shards" / str(shard)).touch()
    encoder = Counting()
    built = ctx.passage_index("hashed-v1", encoder, batch_size=8, shard_rows=SHARD_ROWS)
    assert encoder.rows == PASSAGES and built.meta["shards_reused"] == 0  # its zeros were not taken as done
    assert not work.exists()


def test_a_build_in_progress_in_another_job_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(passages, "POLL_SECONDS", 0.05)
    first = _ctx(tmp_path / "first").passage_index("hashed-v1", hashed_vectors, batch_size=8)
    target = tmp_path / "second" / "indexes" / first.folder.name
    target.parent.mkdir(parents=True)
    other_job = FileLock(str(target.with_name(f".{target.name}.lock")))
    other_job.acquire()
    encoder, result = Counting(), {}
    waiter = threading.Thread(target=lambda: result.update(
        built=_ctx(tmp_path / "second").passage_index("hashed-v1", encoder, batch_size=8)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and not target.exists()  # waiting, not building
    os.rename(first.folder, target)  # the other job publishes its build
    waiter.join(timeout=30)
    other_job.release()
    assert result["built"].folder == target and encoder.rows == 0


def test_waiting_for_a_build_ends_on_a_failure_note_or_a_stopped_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(passages, "POLL_SECONDS", 0.05)
    work = tmp_path / ".partial-x"
    work.mkdir()
    (work / "failed.0").write_text("rank 0: MemoryError: while training the quantiser")
    with pytest.raises(JsaragError, match="the build of x failed: rank 0: MemoryError"):
        passages._await(lambda: False, work, "the build of x")
    (work / "failed.0").unlink()
    monkeypatch.setattr(passages, "HEARTBEAT_STALE", 0.5)
    with pytest.raises(JsaragError, match=r"stopped: .*heartbeat has not changed for 0 s; run again to resume"):
        passages._await(lambda: False, work, "the build of x")
    monkeypatch.setattr(passages, "HEARTBEAT_SECONDS", 0.1)
    started = time.monotonic()
    with passages._heartbeat(work):  # a beating heart keeps it waiting past HEARTBEAT_STALE
        passages._await(lambda: time.monotonic() - started > 2, work, "the build of x")
