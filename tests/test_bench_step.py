"""`jsarag bench step-cost` runs the estimators interleaved on the same batches and reports comparable costs; the
`supervised` floor estimator trains on the gold passage only."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli
from jsarag.api import Batch, Candidates, Context, Example, Scores
from jsarag.kb import KnowledgeBase
from jsarag_plugins.estimators.supervised import Supervised, SupervisedOptions

GPT2_LORA = {"r": 4, "last_layers": 1, "target_modules": ["c_attn", "c_proj", "c_fc"]}  # a frozen lower layer


def test_step_cost_reports_every_estimator_with_ratios(tiny_recipe, tmp_path):
    recipe = tiny_recipe(posterior={"lr": 1e-3}, estimator={"name": "jsa"}, generator={"lora": GPT2_LORA})
    out = tmp_path / "cost.json"
    done = run_cli("bench", "step-cost", "--config", str(recipe), "--rounds", "1", "--warmup", "0", "--out", str(out),
                   "--estimators", "jsa,jsa_noshare:jsa,jsa_plain:jsa,jsa_single:jsa,rag,vrag,floor:supervised",
                   "candidates.prior_top_k=4", "candidates.posterior_top_k=4", "vrag.top_k=4", "jsa.proposals=64",
                   "jsa_noshare.proposals=64", "jsa_plain.proposals=12", "jsa_single.proposals=12")
    report = json.loads(out.read_text())
    rows = report["estimators"]
    assert list(rows) == ["jsa", "jsa_noshare", "jsa_plain", "jsa_single", "rag", "vrag", "floor"]
    assert rows["rag"]["vs_rag"] == 1.0 and rows["floor"]["vs_floor"] == 1.0
    assert all(row["median_s"] > 0 and row["tokens"] > 0 and row["tokens_per_s"] > 0 for row in rows.values())
    assert rows["jsa"]["options"]["proposals"] == 64 and rows["jsa_single"]["options"]["grad_pass"] == "single"
    assert rows["jsa_plain"]["generator_options"] == {"reuse_frozen_layers": False, "share_prefix": False,
                                                      "inference_mode": False}
    assert rows["jsa"]["generator_options"] == {}
    # the floor scores one pair per example, rag its top-4: fewer generator tokens
    assert rows["floor"]["tokens"] < rows["rag"]["tokens"]
    # rescore: proposals without gradient, then only the chain's states with it; single: everything with gradient
    assert rows["jsa"]["tokens_with_grad"] < rows["jsa"]["tokens"]
    assert rows["jsa_single"]["tokens_with_grad"] == rows["jsa_single"]["tokens"]
    # 64 proposals over <= 8 candidates propose every one: the same pairs, with and without the shared prompt prefix,
    # which runs once per example in the no-gradient pass: fewer tokens than without it
    assert rows["jsa"]["stats"]["pairs_scored"] == rows["jsa_noshare"]["stats"]["pairs_scored"]
    nograd = {label: rows[label]["tokens"] - rows[label]["tokens_with_grad"] for label in ("jsa", "jsa_noshare")}
    assert nograd["jsa"] < nograd["jsa_noshare"]
    assert report["settings"]["k_p"] == 4 and "| floor |" in done.stdout


def test_step_cost_over_the_checkpoints_of_a_run(tiny_recipe, tmp_path):
    recipe = tiny_recipe(posterior={"lr": 1e-3}, estimator={"name": "jsa", "proposals": 8},
                         generator={"lora": GPT2_LORA}, train={"max_steps": 4, "checkpoint_every": 2},
                         eval={"max_examples": 2})
    run_cli("train", "--config", str(recipe))
    out = tmp_path / "sweep.json"
    done = run_cli("bench", "step-cost", "--config", str(recipe), "--setting", "recipe", "--rounds", "1",
                   "--warmup", "0", "--out", str(out), "--checkpoints", str(tmp_path / "run"),
                   "--estimators", "jsa,rag,floor:supervised")
    report = json.loads(out.read_text())
    assert [entry["step"] for entry in report["steps"]] == [0, 2, 4]
    assert report["steps"][1]["checkpoint"].endswith("step-0000002")
    # each checkpoint's next batch, where the run's loop state left off: not the first batch again
    assert report["steps"][0]["batches"] != report["steps"][1]["batches"] != report["steps"][2]["batches"]
    assert report["steps"][0]["estimators"]["jsa"]["options"]["proposals"] == 8  # the recipe's setting
    assert report["settings"]["k_p"] == 4 and report["settings"]["setting"] == "recipe"
    seconds = [entry["estimators"]["jsa"]["median_s"] for entry in report["steps"]]
    assert report["average"]["jsa"]["median_s"] == pytest.approx(sum(seconds) / 3)
    assert report["average"]["rag"]["vs_rag"] == 1.0
    assert "### step 2" in done.stdout and "### average over steps 0, 2, 4" in done.stdout


def _kb() -> KnowledgeBase:
    return KnowledgeBase.from_lists(path="kb.jsonl", ids=["a", "b", "c"], titles=["", "", ""], texts=["x", "y", "z"])


def test_supervised_loss_is_the_gold_passage_nll_plus_its_prior_term(tmp_path):
    kb = _kb()
    ctx = Context(role="estimator", kb=kb, output_dir=tmp_path, cache_dir=tmp_path, device=torch.device("cpu"))
    estimator = Supervised(SupervisedOptions(retriever_weight=0.5), ctx)
    examples = [Example("e0", (), "q", "y", ("y",), ("c",)), Example("e1", (), "q", "y", ("y",), ())]
    batch = Batch(examples=examples, positions=[0, 1])
    assert estimator.extra_rows(batch) == [[2], []]
    prior = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]])
    candidates = Candidates(rows=torch.tensor([[0, 1, 2], [0, 1, -1]]), prior_logits=prior.log())
    request = estimator.sample(batch, candidates)
    assert request.example.tolist() == [0] and request.slot.tolist() == [2]  # example 1 has no gold passage
    scores = Scores(token_logprobs=torch.tensor([[math.log(0.25)]]), token_mask=torch.ones(1, 1, dtype=torch.bool))
    result = estimator.update(batch, candidates, request, scores, rescore=None)
    assert math.isclose(result.loss.item(), -(math.log(0.25) + 0.5 * math.log(0.2)), rel_tol=1e-5)
    assert result.stats["with_gold"] == 0.5
