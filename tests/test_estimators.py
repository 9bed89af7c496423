"""Every estimator's gradient for each module (generator, prior, posterior) against the exact one or its known
expectation, in every mode, on the 8-passage problem of latent_problem.py (multi-token answers, empty slots).

Deterministic estimators (exact, rag, rag_token, vrag top-K) must match their closed forms to float precision.
Stochastic ones (jsa, vrag Monte-Carlo) are averaged over thousands of independent chains or draws; their
tolerances are stated next to each check and are several times the Monte-Carlo noise measured at the fixed seed,
and several times smaller than what a wrong sign or a missing term changes (the gradients' entries are 0.01-0.3).
``python tests/mutations.py`` applies a list of wrong estimators one at a time and checks these tests catch each.
"""
from __future__ import annotations

import math

import pytest
import torch
from latent_problem import (
    LIKELIHOOD,
    PRIOR,
    PROPOSAL,
    K,
    Problem,
    elbo_gradients,
    exact,
    marginal_gradients,
    max_error,
    token_marginal_gradients,
)

from jsarag.api import Batch, ScoreRequest, Scores
from jsarag_plugins.estimators.exact import Exact, ExactOptions
from jsarag_plugins.estimators.jsa import Jsa, JsaOptions, run_chain
from jsarag_plugins.estimators.rag import Rag, RagOptions
from jsarag_plugins.estimators.rag_token import RagToken
from jsarag_plugins.estimators.vrag import Vrag, VragOptions

GROUPS = ("generator", "prior", "posterior")
TRUE_POSTERIOR = exact(0).posterior  # π of the 3-token examples (sum likelihood)


def assert_gradients(measured: dict, reference: dict, tolerance: float, groups=GROUPS) -> None:
    errors = {g: max_error(measured, reference, g) for g in groups}
    assert all(e < tolerance for e in errors.values()), f"max |g - g_ref| by module: {errors} (tolerance {tolerance})"


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


# -- deterministic estimators: closed forms --------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["sum", "mean"])
def test_exact_gives_the_exact_gradients(likelihood):
    problem = Problem(batch=4)
    result = problem.step(Exact(ExactOptions(likelihood=likelihood), ctx=None))
    result.loss.backward()
    assert_gradients(problem.per_example(), marginal_gradients(likelihood), 1e-5)
    groups = [exact(g, likelihood) for g in (0, 1)]
    nll = -sum(float(torch.logsumexp(PRIOR.log() + e.loglik, -1)) for e in groups) / 2
    kl = sum(float((e.posterior * (e.posterior / PROPOSAL).log()).sum()) for e in groups) / 2
    assert result.stats["marginal_nll"] == pytest.approx(nll, rel=1e-5)
    assert result.stats["kl_inclusive"] == pytest.approx(kl, rel=1e-5)


@pytest.mark.parametrize("likelihood", ["sum", "mean"])
def test_rag_gives_the_marginal_gradient_over_its_candidates(likelihood):
    problem = Problem(batch=4)
    problem.step(Rag(RagOptions(likelihood=likelihood), ctx=None)).loss.backward()
    assert problem.posterior_logits.grad is None  # rag trains no posterior
    assert_gradients(problem.per_example(), marginal_gradients(likelihood, posterior_trained=False), 1e-5)


def test_rag_token_marginalises_each_answer_token():
    problem = Problem(batch=4)
    problem.step(RagToken(RagToken.Options(), ctx=None)).loss.backward()
    assert_gradients(problem.per_example(), token_marginal_gradients(), 1e-5)


@pytest.mark.parametrize("likelihood", ["sum", "mean"])
@pytest.mark.parametrize("top_k,kl_over,beta", [(K, "posterior", 1.0), (3, "posterior", 0.5), (3, "union", 1.0),
                                                (5, "union", 2.0)])
def test_vrag_top_k_gives_the_elbo_gradient(likelihood, top_k, kl_over, beta):
    problem = Problem(batch=4)
    vrag = Vrag(VragOptions(likelihood=likelihood, top_k=top_k, kl_over=kl_over, beta=beta), ctx=None)
    result = problem.step(vrag)
    result.loss.backward()
    assert_gradients(problem.per_example(), elbo_gradients(likelihood, top_k, beta, kl_over), 1e-5)
    assert len(problem.requests[0]) == 4 * top_k  # only C_q is scored


# -- stochastic estimators: expectations ------------------------------------------------------------------------------

JSA_MODES = [(grad_pass, use, cache) for grad_pass in ("rescore", "single") for use in ("all", "last")
             for cache in (False, True)]


@pytest.mark.parametrize("grad_pass,use,cache", JSA_MODES,
                         ids=[f"{g}-{u}-{'cache' if c else 'fresh'}" for g, u, c in JSA_MODES])
def test_jsa_expected_gradient_is_the_exact_one(grad_pass, use, cache):
    # 16,000 chains of m = 60 (use: all averages 60 states each; use: last weighs one); with the cache, two warm-up
    # steps first, so that the measured chains start from cached states. Error at seed 0: at most 0.01 (use: last,
    # whose one-hot weights have a standard deviation of 0.005 per entry here), 0.003 for use: all.
    torch.manual_seed(0)
    problem = Problem(batch=16000)
    jsa = Jsa(JsaOptions(proposals=60, use=use, cache=cache, grad_pass=grad_pass), ctx=None)
    for _ in range(2 if cache else 0):
        problem.step(jsa)
    problem.zero_grad()
    result = problem.step(jsa)
    result.loss.backward()
    assert result.stats["cache_hit"] == (1.0 if cache else 0.0)
    assert_gradients(problem.per_example(), marginal_gradients("sum"), 0.03)


@pytest.mark.parametrize("grad_pass", ["rescore", "single"])
def test_jsa_mean_likelihood_targets_the_length_normalised_posterior(grad_pass):
    torch.manual_seed(0)
    problem = Problem(batch=4000)
    problem.step(Jsa(JsaOptions(proposals=60, likelihood="mean", grad_pass=grad_pass, cache=False), ctx=None)
                 ).loss.backward()
    assert_gradients(problem.per_example(), marginal_gradients("mean"), 0.03)


def test_jsa_scores_without_gradient_then_rescores_only_the_weighted_states():
    torch.manual_seed(0)
    problem = Problem(batch=64)
    result = problem.step(Jsa(JsaOptions(proposals=20, grad_pass="rescore", use="last", cache=False), ctx=None))
    first, again = problem.requests
    assert not first.grad and again.grad
    assert len(again) == 64  # use: last weighs one state per example
    assert result.stats["ess"] == 1.0
    assert set(zip(again.example.tolist(), again.slot.tolist())) <= set(zip(first.example.tolist(),
                                                                           first.slot.tolist()))
    single = Problem(batch=64)
    single.step(Jsa(JsaOptions(proposals=20, grad_pass="single"), ctx=None))
    assert len(single.requests) == 1 and single.requests[0].grad


@pytest.mark.parametrize("likelihood", ["sum", "mean"])
@pytest.mark.parametrize("top_k,kl_over", [(K, "posterior"), (3, "union")])
def test_vrag_monte_carlo_is_unbiased_for_the_elbo_gradient(likelihood, top_k, kl_over):
    # 20,000 examples x 4 draws; the leave-one-out score-function gradient has noise under 0.006 at seed 0
    torch.manual_seed(0)
    problem = Problem(batch=20000)
    vrag = Vrag(VragOptions(likelihood=likelihood, top_k=top_k, kl_over=kl_over, samples=4), ctx=None)
    problem.step(vrag).loss.backward()
    drawn = problem.requests[0]
    assert len(drawn) <= 20000 * 4 and set(drawn.slot.tolist()) <= set(PROPOSAL.topk(top_k).indices.tolist())
    assert_gradients(problem.per_example(), elbo_gradients(likelihood, top_k, 1.0, kl_over), 0.02)


# -- the chain and its cache ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", [True, False])
def test_only_cached_chains_reach_the_true_posterior_with_one_proposal_a_step(cache):
    # m = 1: a fresh chain's state is its proposal, distributed as q̃ (TV 0.26 from π); a cached chain makes one
    # Metropolis move a step and, after 30 steps of burn-in, visits π (TV < 0.03 over 2,000 chains x 30 steps)
    torch.manual_seed(0)
    jsa = Jsa(JsaOptions(proposals=1, cache=cache, use="last"), ctx=None)
    problem, visits = Problem(batch=2000), torch.zeros(K)
    for step in range(60):
        jsa.extra_rows(problem.batch)
        problem.zero_grad()
        problem.step(jsa).loss.backward()
        if step >= 30:  # the state each even example's chain holds is the weight its gradient put on -log p(y|h)
            weights = -problem.per_example()["generator"][0, :K, -1]
            visits += weights
    tv = total_variation(visits / visits.sum(), TRUE_POSTERIOR)
    if cache:
        assert tv < 0.03
    else:
        assert tv > 0.2  # the control: these settings defeat a chain without its cached state


def test_a_cached_chain_rejects_a_move_at_the_rate_of_its_ratio():
    # state s cached, every proposal h' with [p̃ p(y|h') / q̃(h')] / [p̃ p(y|s) / q̃(s)] = 0.3: 30% accepted
    torch.manual_seed(0)
    chains = 40000
    log_ratio = torch.tensor([[0.0, math.log(0.3), math.log(5.0)]]).repeat(chains, 1)  # (B, 3)
    start = torch.zeros(chains, dtype=torch.long)
    worse = torch.ones(chains, 1, dtype=torch.long)
    states, accepted = run_chain(log_ratio, worse, start)
    assert accepted / chains == pytest.approx(0.3, abs=0.01)  # sd 0.0023
    assert float((states[:, 0] == 1).float().mean()) == pytest.approx(0.3, abs=0.01)
    better = torch.full((chains, 1), 2)
    states, accepted = run_chain(log_ratio, better, start)
    assert accepted == chains and bool((states[:, 0] == 2).all())  # a ratio above one is always accepted
    fresh, accepted = run_chain(log_ratio, worse, torch.full((chains,), -1))
    assert accepted == 0 and bool((fresh[:, 0] == 1).all())  # a fresh chain starts at its first proposal


def test_run_chain_accepts_by_the_full_ratio():
    torch.manual_seed(0)
    log_ratio = (PRIOR * LIKELIHOOD / PROPOSAL).log().unsqueeze(0)  # (1, K)
    proposals = torch.multinomial(PROPOSAL.repeat(100, 1), 2000, replacement=True)  # (100 chains, 2000 steps)
    states, accepted = run_chain(log_ratio.repeat(100, 1), proposals, torch.full((100,), -1))
    freq = torch.bincount(states[:, 100:].flatten(), minlength=K).float() / states[:, 100:].numel()
    assert total_variation(freq, TRUE_POSTERIOR) < 0.01  # 190k states after a burn-in of 100
    assert 0 < accepted < states.numel()


def test_jsa_cache_round_trips_through_state_dict():
    torch.manual_seed(0)
    jsa = Jsa(JsaOptions(proposals=5), ctx=None)
    Problem(batch=6).step(jsa)
    restored = Jsa(JsaOptions(proposals=5), ctx=None)
    restored.load_state_dict(jsa.state_dict())
    assert restored.cache == jsa.cache and len(jsa.cache) == 6
    assert restored.extra_rows(Batch([None] * 2, [0, 99])) == [[jsa.cache[0]], []]


def test_jsa_cache_holds_each_chains_last_state():
    torch.manual_seed(0)
    jsa = Jsa(JsaOptions(proposals=7, use="last", grad_pass="rescore"), ctx=None)
    problem = Problem(batch=32)
    problem.step(jsa)
    last = problem.requests[1]  # use: last rescores exactly the last state of each chain
    assert {int(e): int(s) for e, s in zip(last.example, last.slot)} == jsa.cache


def test_jsa_keeps_the_cached_state_of_an_example_whose_loss_is_not_finite():
    torch.manual_seed(0)
    jsa = Jsa(JsaOptions(proposals=5), ctx=None)
    problem = Problem(batch=2)
    jsa.cache = {0: 7, 1: 7}
    with torch.no_grad():
        problem.prior_logits[1, :K] = float("nan")  # example 1's prior diverged: its loss is NaN
    result = problem.step(jsa)
    assert not torch.isfinite(result.loss)
    assert jsa.cache[1] == 7 and 0 <= jsa.cache[0] < K  # example 0's chain moved on, example 1's state is kept


# -- the ELBO's value ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kl_over", ["posterior", "union"])
def test_vrag_elbo_is_below_the_log_likelihood_and_tight_at_the_true_posterior(kl_over):
    e = exact(0)
    log_marginal = float(torch.logsumexp(PRIOR.log() + e.loglik, -1))
    vrag = Vrag(VragOptions(top_k=K, kl_over=kl_over), ctx=None)
    loose = Problem(batch=1).step(vrag)
    assert -loose.loss.item() == pytest.approx(loose.stats["elbo"], rel=1e-5)
    assert loose.stats["elbo"] < log_marginal - 1e-3
    tight = Problem(batch=1, proposal=TRUE_POSTERIOR).step(vrag)
    assert tight.stats["elbo"] == pytest.approx(log_marginal, abs=1e-5)


def test_rag_token_equals_rag_for_single_token_answers():
    request = ScoreRequest(example=torch.zeros(K, dtype=torch.long), slot=torch.arange(K))
    scores = Scores(token_logprobs=LIKELIHOOD.log().unsqueeze(-1), token_mask=torch.ones(K, 1, dtype=torch.bool))
    a, b = Problem(batch=1), Problem(batch=1)
    rag = Rag(RagOptions(), ctx=None).update(a.batch, a.candidates, request, scores, rescore=None)
    token = RagToken(RagToken.Options(), ctx=None).update(b.batch, b.candidates, request, scores, rescore=None)
    assert math.isclose(rag.loss.item(), token.loss.item(), rel_tol=1e-6)
