"""Training end to end, started the way users start it: resume equals an uninterrupted run; two ranks under
ZeRO-3 through the `deepspeed` launcher lower the loss; the shipped recipe script runs; non-finite losses are skipped
and counted, and a diverged run stops keeping its last good checkpoint; a bad DeepSpeed config is a RecipeError."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, child_env, read_log, run_cli
from jsarag import checkpoint
from jsarag.engine import load_ds_config
from jsarag.errors import RecipeError
from jsarag.recipe import TrainConfig


def _module_state(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    path = output_dir / "checkpoints" / f"step-{step:07d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["module"]


def test_stop_and_resume_equals_uninterrupted_run(tiny_recipe, tmp_path):
    straight = tiny_recipe("straight.yaml", output_dir=str(tmp_path / "straight"),
                           train={"max_steps": 6, "eval_every": 3})
    run_cli("train", "--config", str(straight))
    resumed = tiny_recipe("resumed.yaml", output_dir=str(tmp_path / "resumed"),
                          train={"max_steps": 6, "eval_every": 3})
    run_cli("train", "--config", str(resumed), "train.stop_at=4")
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["final"] == {}
    run_cli("train", "--config", str(resumed))  # resume: auto

    a, b = _module_state(tmp_path / "straight", 6), _module_state(tmp_path / "resumed", 6)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    metrics_a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    metrics_b = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics_a == metrics_b and metrics_a["final"]["dev"]
    assert [r["loss"] for r in read_log(tmp_path / "straight")] == [r["loss"] for r in read_log(tmp_path / "resumed")]


@pytest.mark.launcher
def test_two_ranks_zero3_through_the_launcher_lowers_the_loss(tiny_recipe, tmp_path):
    recipe = tiny_recipe(
        train={"max_steps": 24, "batch_size": 2},
        deepspeed={"config": "zero3.json", "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    )
    done = run_cli("train", "--config", str(recipe), launcher_ranks=2)
    assert "Process" in done.stdout + done.stderr  # the launcher really ran both ranks
    losses = [r["loss"] for r in read_log(tmp_path / "run")]
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["final"]["dev"]) >= {"em", "f1", "recall@1", "recall@10", "mrr@10"}
    shards = list((tmp_path / "run" / "checkpoints").glob("step-*/zero_pp_rank_*_mp_rank_00_model_states.pt"))
    assert len(shards) == 2  # one partition per rank: ZeRO-3 really partitioned


@pytest.mark.integration
def test_the_tiny_recipe_script_runs_as_users_launch_it(tmp_path):
    import subprocess

    command = [sys.executable, "recipes/tiny_rag.py", f"output_dir={tmp_path}", "train.max_steps=3",
               "train.eval_every=0", "train.checkpoint_every=0", "eval.max_examples=8"]
    # the user's cache, as a user's run has (not the session's): the embedded DoQA's index is built once per machine
    env = {k: v for k, v in child_env().items() if k != "JSARAG_CACHE"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| step | split |" in done.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [0, 3]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_every_schedule_warms_up_for_warmup_steps(schedule):
    from jsarag.engine import lr_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_schedule(optimizer, TrainConfig(schedule=schedule, warmup_steps=4, max_steps=100))
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # linear warm-up, then the schedule from its top
    unwarmed = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lr_schedule(unwarmed, TrainConfig(schedule=schedule, warmup_steps=0, max_steps=100))
    assert unwarmed.param_groups[0]["lr"] == 1.0


# -- non-finite losses ------------------------------------------------------------------------------------------------


def test_persistent_divergence_stops_after_max_nonfinite_keeping_the_last_good_checkpoint(tiny_recipe, tmp_path):
    # lr 1e30 without clipping: AdamW's first update moves every generator weight by about 1e30, so every later loss
    # is inf or NaN
    recipe = tiny_recipe(generator={"lr": 1e30},
                         train={"max_steps": 6, "grad_clip": 0, "checkpoint_every": 1, "max_nonfinite": 3})
    done = run_cli("train", "--config", str(recipe), check=False)
    root = tmp_path / "run" / "checkpoints"
    assert done.returncode == 2, done.stderr[-4000:]
    assert "jsarag: error: 3 non-finite losses in a row at step 2 (train.max_nonfinite)" in done.stderr
    assert f"the last good checkpoint is {root / 'step-0000001'}" in done.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["nonfinite_skipped"] == 3 and metrics["final"] == {}
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1]
    assert checkpoint.complete_tags(root) == ["step-0000001"] and checkpoint.latest(root) == "step-0000001"
    loop = checkpoint.load_file(root / "step-0000001" / "loop_rank0.pt", "cpu")["loop"]
    assert loop["step"] == 1 and loop["nonfinite_total"] == 0

    evaluated = run_cli("eval", "--config", str(recipe))  # the kept checkpoint loads through the engine
    assert "step 1 dev:" in evaluated.stdout


@pytest.mark.launcher
def test_a_transient_nonfinite_loss_is_skipped_and_counted(tiny_recipe, tmp_path, monkeypatch):
    # fault injection: rank 1's third micro-step's loss becomes NaN; both ranks must agree to skip it
    monkeypatch.setenv("JSARAG_FAULT", "nonfinite_loss:3")
    monkeypatch.setenv("JSARAG_FAULT_RANK", "1")
    recipe = tiny_recipe(train={"max_steps": 6}, eval={"max_examples": 4})
    done = run_cli("train", "--config", str(recipe), launcher_ranks=2)
    assert done.stderr.count("non-finite loss at step 3: micro-batch skipped (1 in a row)") == 2  # both ranks
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["nonfinite_skipped"] == 1 and metrics["final"]["dev"]
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in log)


def _reduce_on_rank(rank: int, port: int, out: Path) -> None:
    """Average one optimizer step's numbers over 2 gloo ranks whose estimators reported different stats."""
    import os

    from jsarag.loop import _reduce_mean

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    losses, stats = ([1.0], [{"acceptance": 0.5}]) if rank == 0 else \
        ([3.0, 5.0], [{"acceptance": 1.0, "cache_hit": 1.0}, {"cache_hit": 0.0}])
    (out / f"rank{rank}.json").write_text(json.dumps(_reduce_mean(losses, stats)))
    torch.distributed.destroy_process_group()


def test_step_statistics_are_averaged_over_ranks_reporting_different_keys(tmp_path):
    from conftest import _free_port

    torch.multiprocessing.spawn(_reduce_on_rank, args=(_free_port(), tmp_path), nprocs=2)
    expected = [2.5, {"acceptance": 0.75, "cache_hit": 0.5}]  # each rank's mean first, then over those reporting it
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [expected, expected]


# -- the DeepSpeed config ---------------------------------------------------------------------------------------------

def _bad_config(tmp_path: Path, kind: str) -> tuple[str, dict]:
    """A DeepSpeed config name and overrides that are wrong in one way."""
    if kind == "folder":
        return str(tmp_path), {}
    if kind in ("latin-1", "list"):
        path = tmp_path / "ds.json"
        path.write_bytes(b'{"zero_optimization": {"stage": 0}, "comment": "caf\xe9"}' if kind == "latin-1" else b"[1, 2]")
        return str(path), {}
    return "zero0.json", {
        "override of a section by a number": {"bf16": 1},
        "universal checkpoints": {"checkpoint": {"load_universal": True}},
        "decoupled writer": {"checkpoint": {"writer": {"decoupled": True}}},
        "climbing writer path": {"tensorboard": {"enabled": True, "output_path": "../../elsewhere"}},
    }[kind]


@pytest.mark.parametrize("kind,message", [
    ("folder", r"deepspeed.config: .* is a folder"),
    ("latin-1", r"deepspeed.config: .*ds.json is not UTF-8 text"),
    ("list", r"deepspeed.config: .*ds.json holds a JSON list"),
    ("override of a section by a number", r"deepspeed.overrides.bf16: 1 would replace the section 'bf16'"),
    ("universal checkpoints", r"'checkpoint.load_universal' is not supported"),
    ("decoupled writer", r"'checkpoint.writer' is not supported"),
    ("climbing writer path", r"tensorboard.output_path: the relative path '../../elsewhere' climbs out"),
])
def test_a_bad_deepspeed_config_is_a_recipe_error(tmp_path, kind, message):
    name, overrides = _bad_config(tmp_path, kind)
    with pytest.raises(RecipeError, match=message):
        load_ds_config(name, overrides, TrainConfig(), tmp_path / "run")


def test_deepspeed_writes_inside_output_dir_unless_given_an_absolute_path(tmp_path):
    overrides = {"tensorboard": {"enabled": True, "output_path": "tb"}, "csv_monitor": {"enabled": True},
                 "flops_profiler": {"enabled": True, "output_file": "/abs/flops.txt"},
                 "zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "swap"}}}
    config = load_ds_config("zero0.json", overrides, TrainConfig(), tmp_path / "run")
    assert config["tensorboard"]["output_path"] == str(tmp_path / "run" / "tb")
    assert config["csv_monitor"]["output_path"] == str(tmp_path / "run" / "csv_monitor")  # DeepSpeed: the cwd
    assert config["flops_profiler"]["output_file"] == "/abs/flops.txt"
    assert config["zero_optimization"]["offload_optimizer"]["nvme_path"] == str(tmp_path / "run" / "swap")


def test_runs_flush_subnormal_floats_to_zero(tiny_recipe):
    """Subnormal floats slow CPU matmuls ~150x (rag's tiny passage weights make them in backward): runs flush them."""
    script = ("import sys, torch; from jsarag.recipe import load_recipe; from jsarag.run import build_run; "
              "build_run(load_recipe(sys.argv[1], []), train=False, generator=False); "
              "print((torch.full((4,), 1e-39) * 1.0).sum().item())")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_recipe())], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=child_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0.0"


def test_a_mistyped_deepspeed_override_stops_the_run_with_a_clear_message(tiny_recipe):
    done = run_cli("train", "--config", str(tiny_recipe()), 'deepspeed.overrides={"bf16": 1}', check=False)
    assert done.returncode == 2
    assert "jsarag: error: deepspeed.overrides.bf16: 1 would replace the section 'bf16'" in done.stderr
