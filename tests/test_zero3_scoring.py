"""ZeRO-3 on 2 CPU ranks through the `deepspeed` launcher: jsa's rescore from the kept states of the frozen lower
layers keeps the ranks' collectives in step (one pair per forward, so the ranks run different numbers of forwards of
both kinds), and a frozen generator (lr 0) is partitioned by the engine rather than replicated on every rank."""
from __future__ import annotations

import json

import pytest

from conftest import read_log, run_cli
from jsarag.checkpoint import load_file
from jsarag.engine import CHECKPOINT_GLOBALS

ZERO3 = {"config": "zero3.json", "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}
GPT2_LORA = {"r": 4, "last_layers": 1, "target_modules": ["c_attn", "c_proj", "c_fc"]}


@pytest.mark.launcher
def test_jsa_rescore_from_kept_states_trains_under_zero3_on_two_ranks(tiny_recipe, tmp_path):
    recipe = tiny_recipe(estimator={"name": "jsa", "proposals": 8}, posterior={"lr": 1e-3}, deepspeed=ZERO3,
                         generator={"lora": GPT2_LORA, "score_batch_tokens": 64}, train={"max_steps": 4},
                         eval={"max_examples": 4})
    run_cli("train", "--config", str(recipe), launcher_ranks=2, timeout=400)
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(abs(r["loss"]) < 1e4 for r in log)  # finite


@pytest.mark.launcher
def test_a_frozen_generator_trains_under_zero3_and_stays_out_of_checkpoints(tiny_recipe, tmp_path):
    recipe = tiny_recipe(estimator={"name": "jsa", "proposals": 8}, posterior={"lr": 1e-3}, deepspeed=ZERO3,
                         generator={"lr": 0.0}, train={"max_steps": 2, "checkpoint_every": 2},
                         eval={"max_examples": 4})
    run_cli("train", "--config", str(recipe), launcher_ranks=2, timeout=400)
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["dev"]
    folder = tmp_path / "run" / "checkpoints" / "step-0000002"
    ranks = [load_file(folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", "cpu", CHECKPOINT_GLOBALS)
             for r in (0, 1)]
    # checkpoints hold what trains: the frozen generator is in no rank's module state, optimizer group or frozen
    # fragments (DeepSpeed's exclude_frozen_parameters); resume rebuilds it from the base model
    for rank in ranks:
        assert not any(k.startswith("generator.") for k in rank["module"])
        assert not any(name.startswith("generator.") for group in rank["param_shapes"] for name in group)
        assert not any(name.startswith("generator.") for name in rank.get("frozen_param_shapes") or {})
