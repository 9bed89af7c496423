"""Run safety and the first hour of a new user: the output_dir lock, a changed recipe refused on resume (and
accepted with ``resume: force`` where safe), filesystem and launcher errors as one line before any model loads, the
exit codes and grace period of a stop on a signal, top-k settings larger than the KB counted, long texts shortened,
data checked before the KB is embedded, quiet terminals, and report.md's provenance and recipe history.

Signals to two ranks through the `deepspeed` launcher, compared with an uninterrupted run, are in test_crash.py.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_crash import finish, start, without_root_override

from conftest import child_env, read_log, run_cli, tiny_recipe_dict
from jsarag.errors import DataError, RecipeError, TrainingError
from jsarag.recipe import load_recipe
from jsarag.safety import LOCK_FILE, check_resume, lock_output_dir, release_locks, unlock_output_dir

HOST = socket.gethostname()


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """What a failed command printed, line by line (stdout and stderr)."""
    return (done.stdout + done.stderr).strip().splitlines()


# -- a changed recipe on resume ---------------------------------------------------------------------------------------

def _record(recipe_path: Path, *overrides: str, ranks: int = 1) -> dict:
    """What a checkpoint records about its run: the resolved recipe and the number of ranks."""
    return {"recipe": load_recipe(recipe_path, list(overrides)).resolved(), "ranks": ranks}


def _refusal(record: dict, recipe_path: Path, *overrides: str, mode: str = "auto", ranks: int = 1) -> RecipeError:
    current = load_recipe(recipe_path, list(overrides)).resolved()
    with pytest.raises(RecipeError) as caught:
        check_resume(record, current, ranks, mode, "run/checkpoints/step-0000002")
    return caught.value


def test_changed_keys_that_matter_are_listed_and_refused_even_with_force(tiny_recipe, tmp_path):
    path = tiny_recipe()
    for mode in ("auto", "force"):
        error = _refusal(_record(path), path, f"data.dir={tmp_path}", "generator.lr=0.01", mode=mode)
        assert str(error) == ("run/checkpoints/step-0000002 was written by a run with another recipe (2 keys differ); "
                              "resuming would mix the two")
        old_dir = _record(path)["recipe"]["data"]["dir"]
        assert error.__notes__[:2] == [f'data.dir: "{old_dir}" -> "{tmp_path}"', "generator.lr: 0.003 -> 0.01"]
        assert error.__notes__[2].startswith("data.dir, generator.lr cannot change in a resumed run: choose another "
                                             "output_dir for this recipe, or put them back to continue the run")


def test_safe_changes_need_resume_force_and_are_accepted_with_it(tiny_recipe):
    path = tiny_recipe()
    error = _refusal(_record(path), path, "train.max_steps=9", "eval.top_k=5")
    assert error.__notes__ == ["train.max_steps: 6 -> 9", "eval.top_k: 10 -> 5",
                               "to continue the run with these changes set resume: force (safe to change: "
                               "train.max_steps, train.eval_every, eval.*, observers, data.eval_splits); to start "
                               "afresh choose another output_dir"]
    current = load_recipe(path, ["train.max_steps=9", "eval.top_k=5", "resume=force"]).resolved()
    assert check_resume(_record(path), current, 1, "force", "x") == {"train.max_steps": (6, 9), "eval.top_k": (10, 5)}
    ignored = load_recipe(path, ["train.stop_at=2", f"output_dir={path.parent / 'moved'}", "train.checkpoint_every=3"])
    assert check_resume(_record(path), ignored.resolved(), 1, "auto", "x") == {}  # how this invocation ends


def test_another_estimator_or_rank_count_is_a_short_refusal(tiny_recipe):
    path = tiny_recipe()
    error = _refusal(_record(path), path, "estimator.name=jsa", mode="force")
    assert error.__notes__[0] == 'estimator.name: "rag" -> "jsa"'  # not jsa's options, not state-dict keys
    assert len(error.__notes__) == 2 and "(1 key differs)" in str(error), error.__notes__
    assert len(str(error) + "".join(error.__notes__)) < 600
    error = _refusal(_record(path, ranks=2), path)
    assert error.__notes__[0] == "ranks: 2 -> 1" and "cannot change in a resumed run" in error.__notes__[1]


@pytest.fixture(scope="module")
def stopped_run(tiny_recipe_module):
    """A tiny run stopped at step 2 of 4 with a checkpoint (the report observer on); returns its recipe path."""
    recipe = tiny_recipe_module(train={"max_steps": 4, "checkpoint_every": 1}, eval={"max_examples": 2},
                                observers=["jsonl_log", "report"])
    run_cli("train", "--config", str(recipe), "train.stop_at=2")
    return recipe


def test_resuming_with_another_data_dir_and_lr_is_refused_before_models_load(stopped_run, tmp_path):
    done = run_cli("train", "--config", str(stopped_run), f"data.dir={tmp_path}", "generator.lr=0.01", check=False)
    tag = stopped_run.parent / "run" / "checkpoints" / "step-0000002"
    assert done.returncode == 2
    lines = error_lines(done)
    assert lines[0] == (f"jsarag: error: {tag} was written by a run with another recipe (2 keys differ); resuming "
                        "would mix the two")
    assert lines[2] == "  generator.lr: 0.003 -> 0.01" and len(lines) == 4, lines


def test_resuming_with_another_estimator_is_a_short_refusal(stopped_run):
    done = run_cli("train", "--config", str(stopped_run), "estimator.name=jsa", check=False)
    assert done.returncode == 2 and len(done.stderr) < 800, done.stderr[-3000:]
    assert "  estimator.name: \"rag\" -> \"jsa\"" in done.stderr.splitlines() and "Missing key" not in done.stderr


def test_resume_force_continues_with_a_longer_run_and_the_report_shows_both_sessions(stopped_run):
    out = stopped_run.parent / "run"
    refused = run_cli("train", "--config", str(stopped_run), "train.max_steps=3", check=False)
    assert refused.returncode == 2 and "  train.max_steps: 4 -> 3" in refused.stderr.splitlines()
    done = run_cli("train", "--config", str(stopped_run), "train.max_steps=3", "resume=force")
    assert "resume: force: continuing" in done.stderr and "with train.max_steps 4 -> 3" in done.stderr
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    report = (out / "report.md").read_text()
    sessions = report[report.index("## Sessions"):report.index("## Curves")]
    rows = [line for line in sessions.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert " | 0 → 2 | " in rows[0] and "stopped at train.stop_at=2" in rows[0] and rows[0].endswith("| — |")
    assert " | 2 → 3 | " in rows[1] and "| finished |" in rows[1] and rows[1].endswith("`train.max_steps` 4 → 3 |")
    assert "- wall time: " in report and " in 2 sessions (this one: " in report and " s/step (median" in report
    assert "- date: " in report and "jsarag 0.2.0, commit " in report
    resolved = report[report.index("Resolved, with every default:"):]
    assert "grace_seconds: 25.0" in resolved and "max_nonfinite: 5" in resolved  # defaults the recipe never wrote


# -- the output_dir lock ----------------------------------------------------------------------------------------------

HOLD = ("import sys, time; from pathlib import Path; from jsarag.safety import lock_output_dir; "
        "lock_output_dir(Path(sys.argv[1]), command='holder'); print('held', flush=True); time.sleep(600)")


def test_a_held_lock_refuses_at_once_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=child_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainingError) as refused:
            lock_output_dir(tmp_path)
        assert str(refused.value).startswith(f"output_dir {tmp_path} is in use by another run (pid {holder.pid} on "
                                             f"host {HOST}, started ")
        assert str(refused.value).endswith(": holder); two runs in one folder would mix their checkpoints and logs. "
                                           "Wait for it to end or stop it, or choose another output_dir")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="jsarag.safety"):
        lock_output_dir(tmp_path)  # the kernel dropped the dead holder's lock; its record is still in the file
        lock_output_dir(tmp_path)  # held by this process: a no-op
    try:
        assert f"taking over the lock of a run that is gone (pid {holder.pid} on host {HOST}" in caplog.text
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        unlock_output_dir(tmp_path)
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: the next run sees no stale lock


# -- filesystem and launcher errors: one line, before any model loads ------------------------------------------------

@pytest.mark.parametrize("case", ["output_dir is a file", "read-only parent", "read-only output_dir"])
def test_filesystem_errors_are_one_line_naming_the_path_and_the_fix(tiny_recipe, tmp_path, case):
    target = {"output_dir is a file": tmp_path / "file", "read-only parent": tmp_path / "locked" / "run",
              "read-only output_dir": tmp_path / "locked"}[case]
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "locked").mkdir(mode=0o555)
    done = run_cli("train", "--config", str(tiny_recipe()), f"output_dir={target}", check=False,
                   preexec_fn=without_root_override if os.geteuid() == 0 else None)
    expected = {
        "output_dir is a file": f"output_dir: {target} is a file, not a folder; choose another output_dir or move "
                                "the file",
        "read-only parent": f"output_dir: cannot create {target}: permission denied in {target.parent}; choose an "
                            f"output_dir in a folder you can write to, or make {target.parent} writable",
        "read-only output_dir": f"output_dir: {target} is not writable (permission denied); fix its permissions "
                                f"(chmod u+w {target}) or choose another output_dir",
    }[case]
    assert done.returncode == 2 and error_lines(done) == [f"jsarag: error: {expected}"]  # nothing loaded before


@pytest.mark.launcher
def test_a_busy_master_port_under_the_launcher_is_one_line_naming_the_port(tiny_recipe):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_cli("train", "--config", str(tiny_recipe()), launcher_ranks=2, master_port=port, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("jsarag:")]
    assert errors and errors[0].startswith(f"jsarag: error: MASTER_PORT {port} on 127.0.0.1 is already in use "
                                           "(another job's rendezvous?): pass a free port to the launcher, e.g. "
                                           "deepspeed --master_port ")
    assert "Traceback" not in done.stderr and "DistNetworkError" not in done.stderr


@pytest.mark.launcher
def test_a_second_two_rank_run_on_a_busy_output_dir_refuses_and_a_killed_runs_lock_is_taken_over(tiny_recipe,
                                                                                                  tmp_path):
    # the first run must outlast the second one's start (a minute or more here): far more steps than it will run
    recipe = tiny_recipe(train={"max_steps": 100_000, "checkpoint_every": 5}, eval={"max_examples": 2})
    out = tmp_path / "run"
    first = start(recipe)
    try:
        deadline = time.monotonic() + 300
        while first.poll() is None and time.monotonic() < deadline and len(_steps(out)) < 2:
            time.sleep(0.2)
        holder = json.loads((out / LOCK_FILE).read_text())
        second = run_cli("train", "--config", str(recipe), launcher_ranks=2, check=False)
        steps_then = _steps(out)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a machine lost: the lock file still names the first run
        finish(first)
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("jsarag:")]
    command = holder["command"] if len(holder["command"]) <= 120 else holder["command"][:120] + "..."  # one line
    assert errors == [f"jsarag: error: output_dir {out} is in use by another run (pid {holder['pid']} on host {HOST}, "
                      f"started {holder['started']}: {command}); two runs in one folder would mix their "
                      "checkpoints and logs. Wait for it to end or stop it, or choose another output_dir"]
    assert steps_then == list(range(1, len(steps_then) + 1))  # the refused run wrote nothing there

    resumed_from = int((out / "checkpoints" / "latest").read_text().removeprefix("step-"))
    again = run_cli("train", "--config", str(recipe), f"train.stop_at={resumed_from + 2}", launcher_ranks=2)
    assert f"taking over the lock of a run that is gone (pid {holder['pid']} on host {HOST}" in again.stderr
    assert _steps(out) == list(range(1, resumed_from + 3))
    assert (out / LOCK_FILE).read_text() == ""


def _steps(output_dir: Path) -> list[int]:
    log_file = output_dir / "train_log.jsonl"
    return [r["step"] for r in read_log(output_dir)] if log_file.exists() and log_file.read_text().strip() else []


# -- signals in one process: exit codes and the grace period ----------------------------------------------------------

def test_sigint_finishes_the_step_writes_a_checkpoint_and_exits_130(tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 6}, eval={"max_examples": 2})
    done = run_cli("train", "--config", str(recipe), check=False,
                   env={"JSARAG_FAULT": "step:2", "JSARAG_FAULT_SIGNAL": "SIGINT"})  # Ctrl-C after backward
    root = tmp_path / "run" / "checkpoints"
    assert done.returncode == 130, done.stderr[-3000:]
    assert error_lines(done)[-1] == (f"jsarag: stopped by SIGINT after step 2 of 6: checkpoint {root / 'step-0000002'} "
                                     "written; run the same command again to resume")
    assert "Traceback" not in done.stderr and [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final"] == {}


def test_past_the_grace_period_the_run_exits_143_without_a_checkpoint(tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 6, "grace_seconds": 0}, eval={"max_examples": 2})
    done = run_cli("train", "--config", str(recipe), check=False,
                   env={"JSARAG_FAULT": "step:2", "JSARAG_FAULT_SIGNAL": "SIGTERM"})
    assert done.returncode == 143, done.stderr[-3000:]
    assert error_lines(done)[-1] == ("jsarag: no checkpoint within train.grace_seconds (0 s) of SIGTERM: stopping now "
                                     "without a checkpoint; the same command starts afresh (no checkpoint yet)")
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


# -- silent oddities: top-k larger than the KB, long texts; data before embedding; the first run ----------------------

def test_top_k_larger_than_the_kb_is_counted_warned_and_reported(tiny_recipe, caplog):
    from jsarag.loop import counters
    from jsarag.run import build_run
    from jsarag_plugins.observers.report import setup_lines

    recipe = load_recipe(tiny_recipe(candidates={"prior_top_k": 50}, eval={"top_k": 100}))
    with caplog.at_level(logging.WARNING, logger="jsarag.run"):
        run = build_run(recipe, engine=False)
    assert run.clamped == {"eval.top_k": 24, "candidates.prior_top_k": 24}
    assert "eval.top_k: 100 is more than the KB's 24 passages: using 24" in caplog.text
    assert "candidates.prior_top_k: 50 is more than the KB's 24 passages: using 24" in caplog.text
    found = counters(run)
    assert found["clamped_to_kb"] == {"eval.top_k": 24, "candidates.prior_top_k": 24}
    lines = setup_lines(run.ctx.recipe, None, 1, 0, found)
    assert "- evaluation: first 6 examples of each split, prior top-24 (eval.top_k 100 is more than the KB holds)" \
        in lines
    assert "- `candidates.prior_top_k`: 50 is more than the KB's 24 passages: 24 used" in lines


def test_a_one_megabyte_question_is_shortened_in_the_report_and_in_search_output(tiny_recipe, capsys):
    from jsarag.tools.index import index_command
    from jsarag_plugins.observers.report import samples_section

    question = "how long do I knead rye dough " * 35_000  # about 1 MB
    sample = {"id": "q", "question": question, "answer": question, "prediction": question,
              "retrieved": [{"id": "p", "title": question, "text": question, "gold": False}]}
    section = samples_section("dev", 3, [sample])
    one_line = " ".join(question.split())
    assert len(section) < 2_500 and f"… (+{len(one_line) - 400:,} characters)" in section
    index_command("search", tiny_recipe(), [], question[:100_000], 3)  # one argument's limit on Linux: 128 KiB
    printed = capsys.readouterr().out.splitlines()
    query = next(line for line in printed if line.startswith("query: "))  # after the line naming the retriever
    assert query.startswith("query: how long do I knead") and len(query) < 300
    assert "(+99,800 characters)" in query and all(len(line) < 400 for line in printed)


def test_the_data_is_checked_before_anything_is_embedded_or_built(tiny_data, tmp_path, monkeypatch):
    from jsarag.run import build_run

    data = tmp_path / "data"
    data.mkdir()
    (data / "passages.jsonl").write_text((tiny_data / "passages.jsonl").read_text())
    (data / "train.jsonl").write_text('{"id": "broken", "question": \n')
    (data / "dev.jsonl").write_text((tiny_data / "dev.jsonl").read_text())
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(data, tmp_path / "run")))
    monkeypatch.setenv("JSARAG_CACHE", str(tmp_path / "fresh-cache"))
    with pytest.raises(DataError, match="train.jsonl"):
        build_run(load_recipe(path), engine=False)
    assert not (tmp_path / "fresh-cache" / "indexes").exists() and not (tmp_path / "fresh-cache" / "models").exists()


def test_the_first_run_says_what_it_prepares_and_roughly_how_long(tiny_recipe, tmp_path, monkeypatch, caplog):
    from jsarag.run import build_run

    monkeypatch.setenv("JSARAG_CACHE", str(tmp_path / "fresh-cache"))
    recipe = load_recipe(tiny_recipe(retriever={"embed_batch_size": 8}))
    with caplog.at_level(logging.INFO, logger="jsarag.passages"):
        build_run(recipe, train=False, generator=False)
        first = caplog.text
        caplog.clear()
        build_run(recipe, train=False, generator=False)
    assert "preparing the passage index: embedding 24 passages of " in first
    assert "done once: later runs load it from " in first and "embedded 8 of 24 passages; about " in first
    assert "preparing the passage index" not in caplog.text and "loaded index" in caplog.text


def test_verbose_shows_library_lines_that_the_log_file_always_keeps(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    quiet = run_cli("index", "info", "--config", str(recipe), fresh_process=True)
    loud = run_cli("index", "info", "--config", str(recipe), "--verbose", fresh_process=True)  # libraries imported afresh
    assert "sentence_transformers" not in quiet.stderr and "sentence_transformers" in loud.stderr
    assert "built successfully" not in quiet.stdout + quiet.stderr
    kept = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert kept.count("INFO sentence_transformers") >= 2  # both runs'


@pytest.fixture(autouse=True)
def _release_locks():
    """Runs built in this process lock their output_dir; let later runs in other processes have it."""
    yield
    release_locks()



# -- a stale DeepSpeed build lock: one line instead of a silent hang ---------------------------------------------------

def test_a_stale_deepspeed_build_lock_is_one_line_naming_it_and_a_fresh_one_is_left_alone(tiny_recipe, tmp_path,
                                                                                          monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    from jsarag.engine import build_lock, check_build_lock

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)  # torch's default folder, by torch's own rule
    assert build_lock().parent == Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    assert build_lock() == lock
    check_build_lock()  # no lock: nothing to say
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - 9 * 60, time.time() - 9 * 60))
    check_build_lock()  # a build may still be running
    os.utime(lock, (time.time() - 11 * 60, time.time() - 11 * 60))
    done = run_cli("train", "--config", str(tiny_recipe()), check=False, env={"TORCH_EXTENSIONS_DIR": str(lock.parent.parent)},
                   timeout=120, fresh_process=True)  # a process that has not yet joined a process group
    assert done.returncode == 2 and error_lines(done) == [
        f"jsarag: error: {lock} is 11 minutes old: a DeepSpeed op build that was killed left it, and every DeepSpeed "
        f"start would wait on it forever; remove it (rm {lock}) and run again"], done.stderr[-3000:]
