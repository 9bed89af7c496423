"""Training end to end, started the way users start it: resume equals an uninterrupted run; two ranks under
ZeRO-3 through the `deepspeed` launcher lower the loss; the shipped recipe script runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, read_log, run_cli


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
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| step | split |" in done.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [0, 3]
