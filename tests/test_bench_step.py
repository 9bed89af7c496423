"""`jsarag bench step-cost` runs the estimators interleaved on the same batches and reports comparable costs; the
`supervised` floor estimator trains on the gold passage only."""
from __future__ import annotations

import json
import math

import torch

from conftest import run_cli
from jsarag.api import Batch, Candidates, Context, Example, Scores
from jsarag.kb import KnowledgeBase
from jsarag_plugins.estimators.supervised import Supervised, SupervisedOptions


def test_step_cost_reports_every_estimator_with_ratios(tiny_recipe, tmp_path):
    recipe = tiny_recipe(posterior={"lr": 1e-3}, estimator={"name": "jsa"})
    out = tmp_path / "cost.json"
    done = run_cli("bench", "step-cost", "--config", str(recipe), "--rounds", "2", "--warmup", "1", "--out", str(out),
                   "candidates.prior_top_k=4", "candidates.posterior_top_k=4", "vrag.top_k=4", "jsa.proposals=12")
    report = json.loads(out.read_text())
    rows = report["estimators"]
    assert list(rows) == ["jsa", "jsa_single", "rag", "vrag", "floor"]
    assert rows["rag"]["vs_rag"] == 1.0 and rows["floor"]["vs_floor"] == 1.0
    assert all(row["median_s"] > 0 and row["tokens"] > 0 for row in rows.values())
    assert rows["jsa"]["options"]["proposals"] == 12 and rows["jsa_single"]["options"]["grad_pass"] == "single"
    # the floor scores one pair per example, rag its top-4: fewer generator tokens
    assert rows["floor"]["tokens"] < rows["rag"]["tokens"]
    # rescore: proposals without gradient, then only the chain's states with it; single: everything with gradient
    assert rows["jsa"]["tokens_with_grad"] < rows["jsa"]["tokens"]
    assert rows["jsa_single"]["tokens_with_grad"] == rows["jsa_single"]["tokens"]
    assert report["settings"]["k_p"] == 4 and "| floor |" in done.stdout


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
