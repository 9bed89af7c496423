"""Each estimator trains the tiny models through the `deepspeed` launcher on 2 ranks; a resumed `jsa` run, cache
included, equals an uninterrupted one."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import read_log, run_cli

ZERO3 = {"config": "zero3.json", "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}
POSTERIOR = {"lr": 1e-3}  # the posterior: a copy of the prior, with its own learning rate


def _checkpoint(output_dir, step: int):
    folder = output_dir / "checkpoints" / f"step-{step:07d}"
    model = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    loop = torch.load(folder / "loop_rank0.pt", map_location="cpu", weights_only=True)
    return model, loop


def test_resumed_jsa_run_with_cache_equals_uninterrupted(tiny_recipe, tmp_path):
    # 48 examples / batch 4 = 12 steps an epoch: steps 13-16 start their chains from the cache
    common = dict(estimator={"name": "jsa", "proposals": 8, "cache": True}, posterior=POSTERIOR,
                  train={"max_steps": 16, "batch_size": 4}, eval={"max_examples": 4})
    straight = tiny_recipe("straight.yaml", output_dir=str(tmp_path / "straight"), **common)
    resumed = tiny_recipe("resumed.yaml", output_dir=str(tmp_path / "resumed"), **common)
    run_cli("train", "--config", str(straight))
    run_cli("train", "--config", str(resumed), "train.stop_at=14")
    run_cli("train", "--config", str(resumed))

    (model_a, loop_a), (model_b, loop_b) = _checkpoint(tmp_path / "straight", 16), _checkpoint(tmp_path / "resumed", 16)
    for name in model_a:
        torch.testing.assert_close(model_a[name], model_b[name], rtol=0, atol=0, msg=name)
    cache_a, cache_b = loop_a["components"]["estimator"], loop_b["components"]["estimator"]
    assert len(cache_a["positions"]) == 48  # every example has a chain state
    assert torch.equal(cache_a["positions"], cache_b["positions"]) and torch.equal(cache_a["rows"], cache_b["rows"])
    log_a, log_b = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert log_a == [dict(r, time=a["time"]) for r, a in zip(log_b, log_a)]  # same losses and chain statistics
    assert log_a[-1]["cache_hit"] == 1.0 and log_a[0]["cache_hit"] == 0.0
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed")]
    assert metrics[0] == metrics[1]


# one pair per scoring forward: the ranks run different numbers of forwards (JSA's unique proposals differ), which
# ZeRO-3 survives only if the generator keeps its collectives in step
ONE_PAIR_PER_FORWARD = {"score_batch_tokens": 64}


@pytest.mark.launcher
@pytest.mark.parametrize("estimator,candidates,deepspeed,generator", [
    ({"name": "jsa", "proposals": 8}, {}, ZERO3, ONE_PAIR_PER_FORWARD),
    ({"name": "vrag", "top_k": 4}, {}, {"config": "zero2.json"}, {}),
    ({"name": "vrag", "top_k": 4, "samples": 3}, {}, {"config": "zero1.json"}, {}),
    ({"name": "rag_token"}, {}, {"config": "zero0.json"}, {}),
    ({"name": "exact"}, {"mode": "all"}, ZERO3, {}),
], ids=["jsa-zero3-uneven-forwards", "vrag-zero2", "vrag_mc-zero1", "rag_token-zero0", "exact-zero3"])
def test_estimator_trains_on_two_ranks(tiny_recipe, tmp_path, estimator, candidates, deepspeed, generator):
    recipe = tiny_recipe(estimator=estimator, posterior=POSTERIOR, candidates=candidates, deepspeed=deepspeed,
                         generator=generator, train={"max_steps": 4}, eval={"max_examples": 4})
    run_cli("train", "--config", str(recipe), launcher_ranks=2, timeout=300)
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e4 for r in log)  # finite
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["dev"]
    if estimator["name"] == "jsa":
        assert {"acceptance", "unique_states", "ess", "cache_hit"} <= set(log[-1])
