"""`jsarag diagnose grad-variance` on the 24-passage DoQA subset with tiny models.

The generator is the tiny GPT-2 with larger random weights (initializer_range 0.1), so that p(y|x,h) varies by a few
nats across passages and the true posterior differs from the prior: the prior's top-4 then holds well under half of
the posterior's mass, and RAG's truncation shows. JSA's candidates cover the KB (posterior top-24), so its gradient
should match the exact one up to the chain's start-up bias and Monte-Carlo noise. Seeds are fixed.

Thresholds were checked against deliberately broken samplers (same seeds, 8 draws, m = 400): correct MIS gives a
noise-corrected prior bias of 0.11 and a generator bias of 0.008 (RAG: 1.70 and 0.129); an acceptance ratio without the
proposal's correction gives 0.36 on the prior, one with the log-ratio halved 0.50 / 0.019, accepting every proposal
1.01 / 0.041. Each of them fails at least one assertion below.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import run_cli
from jsarag.errors import RecipeError
from jsarag.tools.diagnose import Moments, group_summary, parse_estimators, split_overrides

GROUPS = {"generator", "prior", "posterior"}
SMALL_PROMPTS = ["generator.max_passage_tokens=24", "generator.max_prompt_tokens=48", "generator.max_answer_tokens=12",
                 "generator.dtype=float32"]


@pytest.fixture(scope="module")
def sharp_generator(tmp_path_factory, isolated_cache):
    """The tiny GPT-2's config and tokenizer with weights drawn at initializer_range 0.1 (seed 0)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from jsarag.models import resolve_model

    source, out = resolve_model("jsarag/tiny-gpt2"), tmp_path_factory.mktemp("sharp-gpt2")
    shutil.copytree(source, out, dirs_exist_ok=True)
    config = GPT2Config.from_pretrained(source)
    config.initializer_range = 0.1
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def report(sharp_generator, tiny_data, tmp_path_factory):
    """One diagnose run: rag, vrag (exact ELBO and Monte-Carlo), jsa with m = 400, exact; 8 draws."""
    import yaml

    from conftest import tiny_recipe_dict

    folder = tmp_path_factory.mktemp("diagnose")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_data, folder / "run")))
    out = folder / "grad_variance.json"
    done = run_cli("diagnose", "grad-variance", "--config", str(recipe), "--estimators",
                   "rag,vrag,vrag_mc:vrag,jsa,jsa_m2:jsa,exact", "--draws", "8", "--warmup", "10", "--out", str(out),
                   f"generator.model={sharp_generator}", *SMALL_PROMPTS, "candidates.posterior_top_k=24",
                   "jsa.proposals=400", "jsa_m2.proposals=2", "jsa_m2.use=last", "vrag_mc.samples=4")
    return json.loads(out.read_text()), done.stdout


def test_report_has_every_estimator_and_group(report):
    data, stdout = report
    assert list(data["estimators"]) == ["rag", "vrag", "vrag_mc", "jsa", "jsa@cached", "jsa_m2", "jsa_m2@cached",
                                        "exact"]  # only jsa keeps state: it alone is measured in the cached regime
    settings = data["settings"]
    assert (settings["kb_size"], settings["batch_size"], settings["draws"], settings["likelihood"]) == (24, 2, 8, "sum")
    assert set(settings["groups"]) == GROUPS
    for label, entry in data["estimators"].items():
        assert set(entry["groups"]) == GROUPS, label
        assert entry["cost_tokens"] > 0 and entry["target"], label
        for group in entry["groups"].values():
            assert {"bias", "relative_variance", "grad_norm_mean", "exact_norm", "cost_tokens"} <= set(group)
        assert f"| {label} | prior |" in stdout
    assert data["estimators"]["rag"]["candidates"] == "prior top-4"
    assert data["estimators"]["jsa"]["candidates"] == "prior top-4 ∪ posterior top-24"
    assert settings["warmup"] == 10 and "| jsa@cached | prior |" in stdout
    assert data["estimators"]["exact"]["candidates"] == "all 24 passages"
    assert "bias against the exact gradient is by design" in stdout  # rag's bias is reported as expected


def test_exact_is_unbiased_and_deterministic(report):
    for name, group in report[0]["estimators"]["exact"]["groups"].items():
        assert group["bias"] < 1e-4 and group["relative_variance"] < 1e-8, name  # float noise at most
        assert group["exact_norm"] > 0, name


def test_deterministic_estimators_have_no_variance_and_stochastic_ones_do(report):
    estimators = report[0]["estimators"]
    for label in ("rag", "vrag"):
        assert all(g["relative_variance"] < 1e-8 for g in estimators[label]["groups"].values()), label
    assert not estimators["rag"]["groups"]["posterior"]["trained"]  # RAG has no posterior to train
    stochastic = {"jsa": ("generator", "prior", "posterior"), "vrag_mc": ("generator", "posterior")}
    for label, groups in stochastic.items():  # vrag_mc's prior sees only the KL term, computed exactly
        for group in groups:
            assert estimators[label]["groups"][group]["relative_variance"] > 1e-5, (label, group)
    assert estimators["vrag_mc"]["groups"]["posterior"]["relative_variance"] > 1e-2


def test_jsa_is_far_less_biased_than_truncated_rag(report):
    rag, jsa = report[0]["estimators"]["rag"]["groups"], report[0]["estimators"]["jsa"]["groups"]
    assert rag["prior"]["bias"] > 1.0 and rag["generator"]["bias"] > 0.05  # top-4 of 24 truncates
    assert jsa["generator"]["bias"] < 0.1 * rag["generator"]["bias"]
    for group in ("prior", "posterior"):
        assert jsa[group]["bias_corrected"] < 0.2, group
    assert jsa["prior"]["bias_corrected"] < 0.15 * rag["prior"]["bias"]
    assert jsa["prior"]["cosine"] > 0.95


def test_the_cached_regime_starts_every_chain_from_its_cached_state(report):
    estimators = report[0]["estimators"]
    for label in ("jsa", "jsa_m2"):
        assert estimators[label]["regime"] == "fresh" and estimators[label]["stats"]["cache_hit"] == 0.0
        assert estimators[f"{label}@cached"]["regime"].startswith("cached")
        assert estimators[f"{label}@cached"]["stats"]["cache_hit"] == 1.0


def test_exact_costs_more_tokens_than_rag(report):
    estimators = report[0]["estimators"]
    assert estimators["exact"]["cost_tokens"] > 4 * estimators["rag"]["cost_tokens"]  # 24 passages against 4


@pytest.mark.parametrize("arguments,message", [
    (["--estimators", "rag,nosuch"], "unknown estimator 'nosuch'"),
    (["--estimators", "jsa", "jsa.proposalz=3"], "jsa.proposalz: unknown option of estimator 'jsa'"),
    (["--estimators", "rag", "data.dir=null"], "exact.max_passages=256"),
    (["--estimators", "rag", "--draws", "1"], "at least 2 draws"),
])
def test_errors_are_clear(tiny_recipe, arguments, message):
    done = run_cli("diagnose", "grad-variance", "--config", str(tiny_recipe()), *arguments, check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_estimator_labels_and_options_are_parsed():
    assert parse_estimators("rag, vrag_mc:vrag ,jsa") == [("rag", "rag"), ("vrag_mc", "vrag"), ("jsa", "jsa")]
    with pytest.raises(RecipeError, match="appears twice"):
        parse_estimators("jsa,jsa")
    with pytest.raises(RecipeError, match="recipe section"):
        parse_estimators("train:jsa")
    recipe, options = split_overrides(["jsa.proposals=8", "train.seed=3", "vrag_mc.kl_over=union"], ["jsa", "vrag_mc"])
    assert recipe == ["train.seed=3"] and options == {"jsa": {"proposals": 8}, "vrag_mc": {"kl_over": "union"}}


def test_moments_match_torch():
    torch.manual_seed(0)
    draws = torch.randn(7, 5, dtype=torch.float64) + 3
    moments = Moments()
    for row in draws:
        moments.add(row)
    torch.testing.assert_close(moments.mean, draws.mean(0))
    assert moments.m2 / 6 == pytest.approx(float(draws.var(0).sum()))
    summary = group_summary(moments, draws.mean(0), cost=10.0)
    assert summary["bias"] == pytest.approx(0.0, abs=1e-12) and summary["bias_corrected"] == 0.0
    assert summary["relative_variance"] == pytest.approx(float(draws.var(0).sum() / draws.mean(0).norm() ** 2))


def test_grad_variance_at_every_checkpoint_of_a_run(tiny_recipe, tmp_path):
    recipe = tiny_recipe(estimator={"name": "jsa", "proposals": 8},
                         posterior={"lr": 1e-3},
                         train={"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 5})
    run_cli("train", "--config", str(recipe))
    out = tmp_path / "sweep.json"
    run_cli("diagnose", "grad-variance", "--config", str(recipe), "--estimators", "vrag,jsa", "--draws", "3",
            "--checkpoints", str(tmp_path / "run"), "--out", str(out), *SMALL_PROMPTS)
    report = json.loads(out.read_text())
    assert [entry["step"] for entry in report["steps"]] == [0, 2, 4]
    assert all(entry["not_in_checkpoint"] == [] for entry in report["steps"])
    norms = [entry["exact_norms"]["generator"] for entry in report["steps"]]
    assert len(set(norms)) == 3  # each step's weights were loaded: the exact gradient moved
    for entry in report["steps"]:
        assert set(entry["estimators"]) == {"vrag", "jsa", "jsa@cached"}  # jsa has state: also after a warm-up
        assert set(entry["estimators"]["jsa"]["groups"]) == set(entry["estimators"]["jsa@cached"]["groups"]) == GROUPS
    assert (tmp_path / "sweep_norms.png").stat().st_size > 0 and (tmp_path / "sweep_variance.png").stat().st_size > 0
