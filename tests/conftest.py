"""Shared fixtures: a small DoQA subset, recipes over tiny models, and running `jsarag` the way users do."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from jsarag.data import default_data_dir

REPO = Path(__file__).resolve().parent.parent
JSARAG = [sys.executable, "-m", "jsarag"]
# the launcher of the environment running the tests, activated or not
DEEPSPEED = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed") or "deepspeed"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the modules that run 2-rank launcher tests first (their order kept): they take minutes, and pytest-xdist
    hands modules to its workers in collection order (``--no-loadscope-reorder``: by default it puts the modules with
    the most tests first, which left the one-test 2-minute load test to run alone at the end)."""
    slow = {item.path for item in items if item.get_closest_marker("launcher")}
    items.sort(key=lambda item: item.path not in slow)  # stable: each module stays together


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """A model and index cache of the test session's own (tiny models are built into it once)."""
    cache = tmp_path_factory.mktemp("jsarag-cache")
    os.environ["JSARAG_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session", autouse=True)
def deepspeed_comm_op() -> None:
    """Build DeepSpeed's CPU communication op once, before any test starts (or kills) a DeepSpeed process.

    DeepSpeed JIT-compiles it on the first ``init_distributed`` of a machine (about a minute on 2 cores). A process
    killed while it compiles (a test's timeout, a crash test) leaves a lock file behind, on which every later
    DeepSpeed start would wait forever; built here, in a process nobody kills, no test ever compiles it. The build
    goes into the virtual environment (unless TORCH_EXTENSIONS_DIR says otherwise): a fresh environment never meets
    a lock or a build of another environment's.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    build = ("from deepspeed.accelerator import get_accelerator\n"
             "builder = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
             "if builder is not None and builder.is_compatible():\n"
             "    builder.load(verbose=False)\n")
    try:
        done = subprocess.run([sys.executable, "-c", build], env={**os.environ, "DS_ACCELERATOR": "cpu"},
                              capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.exit("building DeepSpeed's CPU comm op took over 30 minutes: is a stale 'lock' file left in "
                    "$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions/<python>_cpu/deepspeed_shm_comm)?")
    if done.returncode != 0:
        pytest.exit(f"building DeepSpeed's CPU comm op failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _read_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A DoQA cooking subset: 24 passages, the train/dev examples grounded in them."""
    src, out = default_data_dir(), tmp_path_factory.mktemp("tiny-doqa")
    passages = _read_gz(src / "passages.jsonl.gz")[:24]
    ids = {p["id"] for p in passages}
    for split, n in [("train", 48), ("dev", 12)]:
        rows = [e for e in _read_gz(src / f"{split}.jsonl.gz") if set(e["gold_passage_ids"]) <= ids
                and e["answer"] != "CANNOTANSWER"]
        if len(rows) < n:  # dev covers few of the first passages: borrow later train examples
            rows = [e for e in _read_gz(src / "train.jsonl.gz") if set(e["gold_passage_ids"]) <= ids][-n:]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in rows[:n]))
    (out / "passages.jsonl").write_text("".join(json.dumps(p) + "\n" for p in passages))
    return out


def tiny_recipe_dict(data_dir: Path, output_dir: Path, estimator: str = "rag") -> dict:
    """A recipe over tiny models built from a config: seconds per step on CPU."""
    return {
        "output_dir": str(output_dir),
        "data": {"dir": str(data_dir), "max_history_turns": 1},
        "retriever": {"name": "dense", "model": "jsarag/tiny-bert", "lr": 1e-3, "max_length": 64},
        "candidates": {"prior_top_k": 4, "posterior_top_k": 4},
        "index": {"name": "faiss"},
        "generator": {"name": "causal_lm", "model": "jsarag/tiny-gpt2", "lr": 3e-3, "max_passage_tokens": 48,
                      "max_prompt_tokens": 96, "max_answer_tokens": 24, "max_new_tokens": 8},
        "estimator": {"name": estimator},
        "observers": ["jsonl_log"],
        "train": {"max_steps": 6, "batch_size": 2, "seed": 0, "schedule": "constant"},
        "eval": {"max_examples": 6, "batch_size": 4, "top_k": 10},
        "deepspeed": {"config": "zero0.json"},
    }


def recipe_writer(data_dir: Path, folder: Path):
    """``write(name, **sections)``: a tiny recipe in ``folder`` (output_dir ``folder/run``) with sections changed."""

    def write(name: str = "recipe.yaml", **sections) -> Path:
        recipe = tiny_recipe_dict(data_dir, folder / "run")
        for key, value in sections.items():
            old = recipe.get(key)
            if isinstance(value, dict) and isinstance(old, dict) and value.get("name", old.get("name")) == old.get("name"):
                value = {**old, **value}  # the same section with some keys changed (a new name starts afresh)
            recipe[key] = value
        path = folder / name
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


@pytest.fixture
def tiny_recipe(tiny_data, tmp_path):
    """Write a tiny recipe (with nested overrides) and return its path."""
    return recipe_writer(tiny_data, tmp_path)


@pytest.fixture(scope="module")
def tiny_recipe_module(tiny_data, tmp_path_factory):
    """``tiny_recipe`` for module-scoped fixtures (one folder per module)."""
    return recipe_writer(tiny_data, tmp_path_factory.mktemp("recipes"))


LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")  # set by in-process runs


def recipe_context(recipe, cache_dir: Path, role: str = "prior"):
    """The context a component of ``role`` gets in a one-process run of ``recipe`` (built without the run)."""
    import torch

    from jsarag.api import Context
    from jsarag.kb import load_kb
    from jsarag.plugins import Plugins

    ctx = Context(role=role, kb=load_kb(Path(recipe.data.dir) / "passages.jsonl"), output_dir=recipe.output_dir,
                  cache_dir=cache_dir, device=torch.device("cpu"), history_turns=recipe.data.max_history_turns,
                  recipe=recipe.resolved(), recipe_source=recipe.source)
    index = Plugins().component("index", recipe.index.name).cls
    ctx.new_index = lambda: index(recipe.index.options, ctx)
    return ctx


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this one's, less the rendezvous variables an in-process run set (RANK,
    MASTER_PORT, ...: the child would try to join this process's group on its port), plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}, **extra}


def run_cli(*args: str, launcher_ranks: int = 0, timeout: int = 600, check: bool = True,
            env: dict[str, str] | None = None, master_port: int | None = None, preexec_fn=None,
            fresh_process: bool = False) -> subprocess.CompletedProcess:
    """Run `jsarag ...` and return its exit code and output: under `deepspeed --num_gpus N` when launcher_ranks > 0;
    as `python -m jsarag` in a fresh process with ``fresh_process`` (a test that signals or kills it, or that compares
    it with a run in another process, or that sets a variable read when jsarag starts: JSARAG_FAULT*, a fault point
    that kills or signals its own process, always gets one); otherwise in this process through ``jsarag.cli.run`` (no
    interpreter start or imports: seconds a command), with ``env`` set for its duration."""
    fresh_process = fresh_process or any(key.startswith("JSARAG_FAULT") for key in env or {})
    if launcher_ranks or fresh_process or preexec_fn is not None:
        env = {**child_env(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1"), **(env or {})}
        if launcher_ranks:
            command = [DEEPSPEED, "--num_gpus", str(launcher_ranks),
                       "--master_port", str(master_port or _free_port()), "--module", "jsarag", *args]
        else:
            command = [*JSARAG, *args]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=preexec_fn)
    else:
        command = ["jsarag", *args]
        done = _run_in_this_process(list(args), env or {})
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return done


def _run_in_this_process(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``jsarag.cli.run(args)`` as the console script would run it (its ``sys.argv``, the repository as working
    directory, no rendezvous variables of an earlier in-process run, one intra-op thread as a child process gets
    with OMP_NUM_THREADS=1, packages installed since the last run importable and their plugins loaded by a plugin
    manager of its own), with stdout and stderr captured and this process's environment, argv, working directory and
    threads restored afterwards."""
    import contextlib
    import gc
    import importlib
    import io

    import torch

    from jsarag.cli import run
    from jsarag.plugins import get_plugins

    saved = dict(os.environ), list(sys.argv), os.getcwd(), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        for key in LAUNCHER_ENV:  # a bench's child processes would inherit them
            os.environ.pop(key, None)
        os.environ.update(TOKENIZERS_PARALLELISM="false", **env)
        sys.argv = [str(Path(sys.executable).parent / "jsarag"), *args]
        os.chdir(REPO)
        torch.set_num_threads(1)
        importlib.invalidate_caches()  # a plugin package a fixture pip-installed ...
        get_plugins.cache_clear()  # ... and its entry points: the process-wide manager of an earlier run predates it
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run(args)
    finally:
        environ, sys.argv, cwd, threads = saved
        torch.set_num_threads(threads)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        gc.collect()  # the run's models and engine
    return subprocess.CompletedProcess(["jsarag", *args], code, out.getvalue(), err.getvalue())


def _free_port() -> int:
    """A free port for a launcher's rendezvous, below the kernel's ephemeral range and in a block of this pytest-xdist
    worker's own. A port the kernel hands out (bind to port 0) can be handed out again, to a gloo connection of a job
    the other worker runs, in the seconds before the launcher binds it; ports below the range are never handed out."""
    import random
    import socket

    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux
        ephemeral = 32768
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    block = (ephemeral - 10000) // 8
    low = 10000 + block * (worker % 8)
    for port in random.sample(range(low, low + block), 64):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + block - 1}")


def read_log(output_dir: Path) -> list[dict]:
    """The per-step records of a run's train_log.jsonl."""
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def load_pt(path: Path) -> Any:
    """Read a checkpoint file the way resuming does (weights_only, DeepSpeed's own classes allowed)."""
    from jsarag.checkpoint import load_file
    from jsarag.engine import CHECKPOINT_GLOBALS

    return load_file(path, "cpu", CHECKPOINT_GLOBALS)


def assert_equal(a: Any, b: Any, where: str) -> None:
    """Assert two loaded checkpoint values are identical: tensors bit for bit, containers item by item."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):  # DeepSpeed's loss scaler
        assert type(a) is type(b), where
        assert_equal(vars(a), vars(b), where)
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN equals NaN here


def predictions_under_zero0_and_zero3(tiny_recipe, tmp_path: Path, generator: dict, max_examples: int) -> list[str]:
    """The dev predictions files of `jsarag eval` in one process under ZeRO-0 and on 2 ranks under ZeRO-3 (every
    parameter partitioned), one example a batch: decoding must not depend on how the weights are held."""
    common = dict(generator=generator, eval={"max_examples": max_examples, "batch_size": 1}, observers=["jsonl_log"])
    zero0 = tiny_recipe("zero0.yaml", output_dir=str(tmp_path / "zero0"), **common)
    zero3 = tiny_recipe("zero3.yaml", output_dir=str(tmp_path / "zero3"), deepspeed={
        "config": "zero3.json", "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}, **common)
    run_cli("eval", "--config", str(zero0))
    run_cli("eval", "--config", str(zero3), launcher_ranks=2)
    return [(tmp_path / d / "predictions" / "dev-step0000000.jsonl").read_text() for d in ("zero0", "zero3")]
