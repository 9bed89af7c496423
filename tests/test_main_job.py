"""The main job: the JSA recipe with the pretrained offline models runs as users launch it; the recipe swaps
validate; decoding gives the same text under ZeRO-0 in one process and ZeRO-3 on two ranks."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, child_env, predictions_under_zero0_and_zero3
from jsarag.recipe import load_recipe

RECIPES = REPO / "recipes"


def test_recipe_swaps_change_only_the_estimator():
    jsa = load_recipe(RECIPES / "dialog_jsa.yaml")
    for name, estimator in [("dialog_rag.yaml", "rag"), ("dialog_vrag.yaml", "vrag")]:
        swapped = load_recipe(RECIPES / name)
        assert swapped.estimator.name == estimator and swapped.output_dir != jsa.output_dir
        for section in ("retriever", "generator", "index"):
            assert getattr(swapped, section) == getattr(jsa, section), section
        assert swapped.train == jsa.train and swapped.eval == jsa.eval and swapped.data == jsa.data
    qa = load_recipe(RECIPES / "qa_jsa.yaml")
    assert qa.estimator == jsa.estimator and qa.data.max_history_turns == 0


@pytest.mark.integration
def test_main_recipe_runs_with_the_offline_models(tmp_path):
    # the user's cache (not the session's): SmolLM2 is converted once per machine
    env = {k: v for k, v in child_env(PYTHONUNBUFFERED="1").items() if k != "JSARAG_CACHE"}
    command = [sys.executable, "recipes/dialog_jsa.py", f"output_dir={tmp_path}", "train.max_steps=2",
               "train.checkpoint_every=0", "eval.max_examples=4", "eval.batch_size=4"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-5000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [0, 2]
    assert {"recall@1", "recall@10", "mrr@10", "f1", "bleu1", "rougeL"} <= set(metrics["final"]["dev"])
    steps = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert all(0 <= r["acceptance"] <= 1 for r in steps if "acceptance" in r)
    assert "| step | split |" in done.stdout and (tmp_path / "report.md").exists()


@pytest.mark.launcher
def test_decoding_is_identical_under_zero0_and_zero3(tiny_recipe, tmp_path):
    texts = predictions_under_zero0_and_zero3(tiny_recipe, tmp_path, {"decode": "joint", "decode_k": 2,
                                              "max_new_tokens": 6}, max_examples=6)
    assert texts[0] == texts[1]
    predictions = [json.loads(line)["prediction"] for line in texts[0].splitlines()]
    assert len(predictions) == 5 and any(predictions)  # the fixture's dev split has 5 examples; text was decoded
