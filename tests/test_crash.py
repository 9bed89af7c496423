"""Crash safety, with runs started the way users start them. Two ranks through the `deepspeed` launcher are killed with
SIGKILL at a step, an evaluation and a checkpoint write (deterministic fault points: JSARAG_FAULT, jsarag/faults.py)
and at a random moment; a checkpoint write fails on a full disk (RLIMIT_FSIZE) and on a permission error; checkpoint
files and pointers are hostile. The previous checkpoint must stay intact, every failure must say what to do, and
running the same command again (resume: auto) must end exactly where an uninterrupted run ends: every tensor of the
checkpoint (parameters, optimizer states, JSA cache, RNG states), metrics.json and the training log."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from conftest import DEEPSPEED, REPO, _free_port, assert_equal, load_pt, read_log, run_cli, tiny_recipe_dict
from jsarag import checkpoint
from jsarag.errors import TrainingError

# JSA with its cache, 2 ranks x 4 examples: 6 steps an epoch, so steps 7-8 start their chains from the cache
JSA_ZERO2 = {"estimator": {"name": "jsa", "proposals": 8, "cache": True}, "posterior": {"lr": 1e-3},
             "train": {"max_steps": 8, "batch_size": 4, "eval_every": 4, "checkpoint_every": 2},
             "eval": {"max_examples": 4}, "deepspeed": {"config": "zero2.json"}}
# ZeRO-0: rank 0 alone writes the model and optimizer states (MiBs), rank 1 only its loop state (KiBs)
RAG_ZERO0 = {"train": {"max_steps": 6, "batch_size": 2, "checkpoint_every": 2}, "eval": {"max_examples": 4},
             "deepspeed": {"config": "zero0.json"}}
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>


@dataclass
class Reference:
    """An uninterrupted run to compare against."""

    output_dir: Path
    training_seconds: float  # from the first step's record in train_log.jsonl to the last write of metrics.json


def write_recipe(data_dir: Path, folder: Path, sections: dict[str, Any]) -> Path:
    """Write the tiny recipe with ``sections`` merged in, training into ``folder``/run."""
    recipe = tiny_recipe_dict(data_dir, folder / "run")
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(recipe.get(key), dict) else value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def start(recipe: Path, *overrides: str, env: dict[str, str] | None = None,
          preexec_fn: Callable[[], None] | None = None, port: int | None = None) -> subprocess.Popen:
    """Start `deepspeed --num_gpus 2 --module jsarag train` (as conftest.run_cli does) in a process group of its own."""
    command = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port or _free_port()),
               "--module", "jsarag", "train", "--config", str(recipe), *overrides]
    base = {k: v for k, v in os.environ.items() if not k.startswith("JSARAG_FAULT")}
    env = {**base, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec_fn)


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for a started job (killing its whole group if it hangs past ``timeout``)."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"the job hung for {timeout} s and was killed\n{out[-3000:]}\n{err[-5000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def launch(recipe: Path, *overrides: str, **options: Any) -> subprocess.CompletedProcess:
    """Run a 2-rank training job to its end."""
    return finish(start(recipe, *overrides, **options))


def succeeded(done: subprocess.CompletedProcess) -> bool:
    """True when the job exited 0 (its output is printed otherwise, for the test report)."""
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-6000:], sep="\n")
    return done.returncode == 0


def shared_memory_left(port: int) -> list[str]:
    """Files a job on ``port`` left in /dev/shm (DeepSpeed's CPU all-reduce buffers: 66 MiB of RAM each)."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def assert_same_run(expected: Path, actual: Path, step: int) -> None:
    """Two runs ended alike: every file of the final checkpoint, metrics.json and the training log."""
    tag = checkpoint.tag_for(step)
    a, b = expected / "checkpoints" / tag, actual / "checkpoints" / tag
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"loop_rank0.pt", "loop_rank1.pt"} <= set(names)
    for name in names:
        assert_equal(training_state(load_pt(a / name)), training_state(load_pt(b / name)), name)
    assert checkpoint.latest(actual / "checkpoints") == tag
    assert not list((actual / "checkpoints").glob(".*-step-*")), "a hidden half or old checkpoint was left behind"
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (expected, actual)]
    assert metrics[0] == metrics[1] and metrics[0]["final"]
    log_a, log_b = read_log(expected), read_log(actual)
    assert [r["step"] for r in log_a] == list(range(1, step + 1))
    assert log_a == [dict(r, time=x["time"]) for r, x in zip(log_b, log_a)] and len(log_a) == len(log_b)


def training_state(saved: Any) -> Any:
    """A checkpoint file's content without the record of the run that wrote it (its recipe, with output_dir, and its
    sessions, with dates and wall times): what training continues from."""
    return {k: v for k, v in saved.items() if k != "run"} if isinstance(saved, dict) else saved


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def reference_run(data_dir: Path, folder: Path, sections: dict[str, Any]) -> Reference:
    """Train uninterrupted and time it (after one single-process step has built the tiny models and the index, so
    that the time is the job's alone)."""
    recipe = write_recipe(data_dir, folder, sections)
    run_cli("train", "--config", str(recipe), f"output_dir={folder / 'warm-up'}", "train.max_steps=1",
            "eval.max_examples=1")
    assert succeeded(launch(recipe))
    run = folder / "run"
    return Reference(run, (run / "metrics.json").stat().st_mtime - read_log(run)[0]["time"])


@pytest.fixture(scope="module")
def jsa_reference(tiny_data, tmp_path_factory) -> Reference:
    """JSA (cache on), ZeRO-2, 2 ranks, 8 steps, uninterrupted."""
    return reference_run(tiny_data, tmp_path_factory.mktemp("jsa-reference"), JSA_ZERO2)


@pytest.fixture(scope="module")
def rag_reference(tiny_data, tmp_path_factory) -> Reference:
    """RAG, ZeRO-0, 2 ranks, 6 steps, uninterrupted."""
    return reference_run(tiny_data, tmp_path_factory.mktemp("rag-reference"), RAG_ZERO0)


# -- kill -9 ----------------------------------------------------------------------------------------------------------

# JSARAG_FAULT, the rank killed, the last complete checkpoint at the kill. One job, killed at each point in turn and
# resumed each time by the same command: a point's count is of arrivals in the process it kills, which starts from the
# previous kill's checkpoint, so every point falls where it would in a fresh run: in step 4's evaluation, in step 4's
# checkpoint write, and in step 5 (the 3rd step after step 2's checkpoint). Each resume also starts over what the kill
# before it left: a half-written hidden folder, then a published folder that `latest` does not name yet.
KILLS = [
    ("eval:1", "0", 2),  # the evaluation at step 4, before its metrics and step 4's checkpoint
    ("checkpoint_written:1", "0", 2),  # step 4's files all written, not renamed into place
    ("checkpoint_renamed:1", "0", 2),  # step-0000004 in place, `latest` still names step 2
    ("step:3", "1", 4),  # step 5, after backward, before the optimizer step
]


@pytest.mark.launcher
def test_kill_9_at_each_fault_point_then_resume_equals_uninterrupted_run(jsa_reference, tiny_data, tmp_path):
    recipe, root = write_recipe(tiny_data, tmp_path, JSA_ZERO2), tmp_path / "run" / "checkpoints"
    resumes_from = None
    for fault, rank, survivor in KILLS:
        port = _free_port()
        killed = launch(recipe, env={"JSARAG_FAULT": fault, "JSARAG_FAULT_RANK": rank}, port=port)
        assert killed.returncode != 0 and f"fault injected: SIGKILL at {fault}" in killed.stdout, \
            f"{fault}: {killed.stderr[-3000:]}"
        if resumes_from is not None:
            assert f"resumed from {root / checkpoint.tag_for(resumes_from)}" in killed.stderr, fault
        assert shared_memory_left(port) == [], fault  # a killed job leaves no RAM-backed files behind
        assert checkpoint.latest(root) == checkpoint.tag_for(survivor), fault
        if fault.startswith("checkpoint_written"):
            assert (root / ".tmp-step-0000004" / "loop_rank0.pt").is_file()  # the half checkpoint is there, unused
        if fault.startswith("checkpoint_renamed"):
            assert (root / "latest").read_text() == "step-0000002" and (root / "step-0000004").is_dir()
        resumes_from = survivor

    resumed = launch(recipe)  # the same command again: resume: auto
    assert succeeded(resumed)
    assert f"resumed from {root / checkpoint.tag_for(resumes_from)}" in resumed.stderr
    assert_same_run(jsa_reference.output_dir, tmp_path / "run", 8)


def wait_for_first_step(job: subprocess.Popen, log_file: Path, timeout: float = 300) -> None:
    """Wait until the job has logged a step of its own (or ended): one more line than the log held at its start."""
    before = log_file.read_text().count("\n") if log_file.exists() else 0
    deadline = time.monotonic() + timeout
    while job.poll() is None and time.monotonic() < deadline:
        if log_file.exists() and log_file.read_text().count("\n") > before:
            return
        time.sleep(0.2)


@pytest.mark.launcher
def test_kill_9_of_the_whole_job_at_a_random_moment(jsa_reference, tiny_data, tmp_path):
    seed = int(os.environ.get("JSARAG_KILL_SEED") or random.SystemRandom().randrange(2**32))
    delay = random.Random(seed).uniform(0, 0.9) * jsa_reference.training_seconds
    print(f"\nrandom kill: JSARAG_KILL_SEED={seed}: SIGKILL to the job's process group {delay:.1f} s after its first "
          f"step (the uninterrupted run went on for {jsa_reference.training_seconds:.1f} s after it)")
    recipe = write_recipe(tiny_data, tmp_path, JSA_ZERO2)
    job = start(recipe)
    wait_for_first_step(job, tmp_path / "run" / "train_log.jsonl")
    try:
        job.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
    else:
        print("the job had already finished: nothing was killed")
    finish(job)
    root = tmp_path / "run" / "checkpoints"
    hidden = sorted(p.name for p in root.glob(".*-step-*")) if root.is_dir() else []
    lines = (tmp_path / "run" / "train_log.jsonl").read_text().count("\n")
    print(f"at the kill: {lines} lines in train_log.jsonl, latest complete checkpoint {checkpoint.latest(root)}, "
          f"hidden folders {hidden}")

    assert succeeded(launch(recipe))
    assert_same_run(jsa_reference.output_dir, tmp_path / "run", 8)


# -- SIGINT and SIGTERM -----------------------------------------------------------------------------------------------

def stopped_at(done: subprocess.CompletedProcess, name: str, root: Path) -> int:
    """The step a job stopped at on a signal, read from its one line (rank 0 alone prints it)."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("jsarag: stopped by")]
    assert len(lines) == 1, done.stderr[-5000:]
    match = re.fullmatch(rf"jsarag: stopped by {name} after step (\d+) of 8: checkpoint {re.escape(str(root))}/"
                         r"step-(\d{7}) written; run the same command again to resume", lines[0])
    assert match and int(match[1]) == int(match[2]), lines[0]
    return int(match[1])


@pytest.mark.launcher
def test_signals_to_the_job_and_to_one_rank_checkpoint_and_resume_to_the_uninterrupted_result(jsa_reference,
                                                                                              tiny_data, tmp_path):
    """Ctrl-C sends SIGINT to every process of the terminal's job; a scheduler sends SIGTERM to every process, a
    node's agent may send it to one rank. One job gets SIGINT after its first step; resumed, its rank 1 alone gets
    SIGTERM after the first batch of the evaluation at step 4; resumed again (that evaluation redone), the whole job
    gets SIGTERM after its first record; resumed once more, it ends where the uninterrupted run ends."""
    recipe, run = write_recipe(tiny_data, tmp_path, JSA_ZERO2), tmp_path / "run"
    root = run / "checkpoints"
    steps = [0]

    def whole_job(name: str) -> subprocess.CompletedProcess:
        job = start(recipe)
        wait_for_first_step(job, run / "train_log.jsonl")
        os.killpg(job.pid, getattr(signal, name))
        stopped = finish(job)
        assert stopped.returncode == -getattr(signal, name), stopped.stderr[-5000:]  # 130 / 143 in a shell
        assert stopped.stderr.count(f"jsarag.safety: {name}: finishing the current step, then writing a checkpoint") == 2
        # the only traceback is the `deepspeed` runner's own KeyboardInterrupt (DeepSpeed's launcher, not jsarag)
        assert stopped.stderr.count("Traceback") == (name == "SIGINT"), stopped.stderr[-5000:]
        return stopped

    def stopped_after(stopped: subprocess.CompletedProcess, name: str) -> int:
        if steps[-1]:
            assert f"resumed from {root / checkpoint.tag_for(steps[-1])}" in stopped.stderr
        step = stopped_at(stopped, name, root)
        assert checkpoint.latest(root) == checkpoint.tag_for(step) and steps[-1] < step < 8, (name, steps, step)
        steps.append(step)
        return step

    assert stopped_after(whole_job("SIGINT"), "SIGINT") < 4, "the chain needs step 4's evaluation still ahead"

    # rank 1 alone gets SIGTERM after the first batch of the evaluation at step 4 (this process's first evaluation)
    env = {"JSARAG_FAULT": "eval:1", "JSARAG_FAULT_RANK": "1", "JSARAG_FAULT_SIGNAL": "SIGTERM"}
    stopped = launch(recipe, env=env)
    assert stopped.returncode == 143, stopped.stderr[-5000:]  # the ranks' own code, passed on by the launcher
    assert stopped_after(stopped, "SIGTERM") == 4
    assert json.loads((run / "metrics.json").read_text())["history"] == []  # abandoned, not recorded
    assert not list((run / "predictions").glob("*step0000004*"))

    stopped_after(whole_job("SIGTERM"), "SIGTERM")  # its first record is step 4's evaluation, redone

    resumed = launch(recipe)
    assert succeeded(resumed)
    assert f"resumed from {root / checkpoint.tag_for(steps[-1])}" in resumed.stderr
    assert_same_run(jsa_reference.output_dir, run, 8)


# -- write errors while checkpointing ---------------------------------------------------------------------------------

def file_size_limit(limit: int) -> Callable[[], None]:
    """A preexec_fn setting RLIMIT_FSIZE: a longer write fails with EFBIG (Python ignores SIGXFSZ), like a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def without_root_override() -> None:
    """A preexec_fn dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: root then obeys file modes like any user (the
    interpreter may live under /root, 0700, so the job cannot run as `nobody`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def assert_write_error_stops_cleanly(failed: subprocess.CompletedProcess, root: Path, before: dict[str, str],
                                     reason: str) -> None:
    """Both ranks stopped on the same error, exit code 2, with a clear message; the checkpoints are as they were.

    The launcher kills the other ranks as soon as one exits, so only the first rank's message is sure to be printed;
    every rank logs that it stops before any rank exits.
    """
    assert failed.returncode == 2, failed.stderr[-5000:]
    for rank in (0, 1):
        assert f"rank {rank} stops: checkpoint {root / 'step-0000004'} could not be written" in failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("jsarag: error: could not write checkpoint")]
    assert errors and len(set(errors)) == 1, failed.stderr[-5000:]  # the same words on every rank that printed
    assert "Traceback" not in failed.stderr
    assert f"{root / 'step-0000004'}: " in errors[0] and reason in errors[0]
    assert f"the previous checkpoint {root / 'step-0000002'} is intact" in errors[0]
    assert "run the same command again" in errors[0]
    assert snapshot(root) == before  # step 2 untouched, `latest` unchanged, no half checkpoint left
    assert checkpoint.latest(root) == "step-0000002"


@pytest.mark.launcher
def test_a_full_disk_then_a_permission_error_while_checkpointing_keep_the_previous_checkpoint(rag_reference, tiny_data,
                                                                                              tmp_path):
    """Two write errors in turn on one run stopped at step 2: each job stops cleanly at step 4's checkpoint and leaves
    the checkpoints as they were; with space and permissions back, the same command resumes and finishes."""
    recipe = write_recipe(tiny_data, tmp_path, RAG_ZERO0)
    assert succeeded(launch(recipe, "train.stop_at=2"))
    root = tmp_path / "run" / "checkpoints"
    before = snapshot(root)
    limit = (root / "step-0000002" / "mp_rank_00_model_states.pt").stat().st_size // 4
    assert (root / "step-0000002" / "loop_rank1.pt").stat().st_size < limit  # rank 1's writes fit: only rank 0 fails

    failed = launch(recipe, preexec_fn=file_size_limit(limit))  # a full disk
    assert_write_error_stops_cleanly(failed, root, before, f"rank 0: {root / '.tmp-step-0000004'}")
    assert "file size limit reached" in failed.stderr

    root.chmod(0o555)
    try:
        failed = launch(recipe, preexec_fn=without_root_override if os.geteuid() == 0 else None)
    finally:
        root.chmod(0o755)
    assert_write_error_stops_cleanly(failed, root, before, "permission denied")

    assert succeeded(launch(recipe))  # space and permissions again: the same command resumes and finishes
    assert_same_run(rag_reference.output_dir, tmp_path / "run", 6)


# -- hostile and stale files ------------------------------------------------------------------------------------------

class CreatesMarker:
    """Unpickling this runs `touch <marker>`: what a hostile checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_a_hostile_checkpoint_file_is_refused_unexecuted(tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 4, "checkpoint_every": 2}, eval={"max_examples": 2},
                         deepspeed={"config": "zero1.json"})
    run_cli("train", "--config", str(recipe), "train.stop_at=2")
    victim = tmp_path / "run" / "checkpoints" / "step-0000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker, control = tmp_path / "marker", tmp_path / "control"
    torch.save({"optimizer_state_dict": CreatesMarker(marker)}, victim)
    torch.save(CreatesMarker(control), tmp_path / "control.pt")
    subprocess.run([sys.executable, "-c", f"import torch; torch.load('{tmp_path / 'control.pt'}', weights_only=False)"],
                   check=True, capture_output=True)
    assert control.exists()  # the payload is real: unpickled without weights_only, it runs

    done = run_cli("train", "--config", str(recipe), check=False)
    assert done.returncode == 2, done.stderr[-4000:]
    assert f"jsarag: error: {victim}: refused to load" in done.stderr and "posix.system" in done.stderr
    assert not marker.exists()


def test_a_checkpoint_missing_deepspeed_files_is_a_clear_error(tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 2, "checkpoint_every": 1}, eval={"max_examples": 2})
    run_cli("train", "--config", str(recipe), "train.stop_at=1")
    folder = tmp_path / "run" / "checkpoints" / "step-0000001"
    (folder / "mp_rank_00_model_states.pt").unlink()
    done = run_cli("train", "--config", str(recipe), check=False)
    assert done.returncode == 2
    assert f"jsarag: error: {folder}: DeepSpeed cannot resume from it" in done.stderr
    assert "delete it to resume from the checkpoint before it" in done.stderr


def test_latest_pointer_is_validated_and_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for tag in ("step-0000002", "step-0000010", ".tmp-step-0000012"):
        (root / tag).mkdir(parents=True)
    assert checkpoint.latest(root) == "step-0000010"  # no pointer (killed before writing it): newest by step
    (root / "latest").write_text("step-0000004")  # names a missing folder
    assert checkpoint.latest(root) == "step-0000010"
    (root / "latest").write_text("step-0000002")
    assert checkpoint.latest(root) == "step-0000002"
    (root / "latest").write_text("../../elsewhere")
    with pytest.raises(TrainingError, match=r"latest names '../../elsewhere', which is not a checkpoint folder"):
        checkpoint.latest(root)


def test_prune_keeps_the_newest_by_step_and_never_the_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (200, 300, 400, 500, 10_000_000):  # step 10,000,000 has 8 digits: sorting by name would misplace it
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
    (root / "latest").write_text("step-0000300")  # an older run's later folders are around
    checkpoint.prune(root, keep=2)
    assert checkpoint.complete_tags(root) == ["step-0000300", "step-0000500", "step-10000000"]


def test_resume_never_refuses_an_output_dir_with_checkpoints(tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 2, "checkpoint_every": 1}, eval={"max_examples": 2})
    run_cli("train", "--config", str(recipe), "train.stop_at=1")
    done = run_cli("train", "--config", str(recipe), "resume=never", check=False)
    assert done.returncode == 2
    assert f"resume: never, but {tmp_path / 'run' / 'checkpoints'} already holds checkpoints" in done.stderr
    assert checkpoint.latest(tmp_path / "run" / "checkpoints") == "step-0000001"


def test_a_torn_last_log_line_is_dropped_on_resume(tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 3, "checkpoint_every": 1}, eval={"max_examples": 2},
                         observers=["jsonl_log", "report"])
    run_cli("train", "--config", str(recipe), "train.stop_at=2")
    log_file = tmp_path / "run" / "train_log.jsonl"
    with log_file.open("a") as f:
        f.write('{"step": 3, "time": 1.0, "lo')  # a kill -9 in the middle of a write
    run_cli("train", "--config", str(recipe))
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3]
    assert (tmp_path / "run" / "report.md").exists()
