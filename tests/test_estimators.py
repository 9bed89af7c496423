"""Estimators against exact enumeration on a KB of 8 passages: the MIS chain converges to the true posterior,
JSA's expected gradient is the exact one, the VRAG ELBO bounds the log-likelihood, exact/rag_token are consistent.

All randomness is seeded; tolerances are stated next to each check.
"""
from __future__ import annotations

import math

import pytest
import torch

from jsarag.api import Batch, Candidates, ScoreRequest, Scores
from jsarag_plugins.estimators.exact import Exact, ExactOptions
from jsarag_plugins.estimators.jsa import Jsa, JsaOptions, run_chain
from jsarag_plugins.estimators.rag import Rag, RagOptions
from jsarag_plugins.estimators.rag_token import RagToken
from jsarag_plugins.estimators.vrag import Vrag, VragOptions

K = 8
PRIOR = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.07, 0.05, 0.03])  # p(h|x)
LIKELIHOOD = torch.tensor([0.01, 0.30, 0.05, 0.60, 0.02, 0.20, 0.40, 0.10])  # p(y|x,h)
PROPOSAL = torch.tensor([0.10, 0.20, 0.05, 0.25, 0.05, 0.15, 0.15, 0.05])  # q(h|x,y), deliberately imperfect
TRUE_POSTERIOR = PRIOR * LIKELIHOOD / (PRIOR * LIKELIHOOD).sum()


class Problem:
    """B copies of one example whose candidates are the whole 8-passage KB; scores are looked up exactly."""

    def __init__(self, batch: int, proposal: torch.Tensor = PROPOSAL) -> None:
        self.batch = Batch(examples=[None] * batch, positions=list(range(batch)))
        self.prior_logits = PRIOR.log().repeat(batch, 1).requires_grad_()  # (B, K)
        self.posterior_logits = proposal.log().repeat(batch, 1).requires_grad_()  # (B, K)
        self.candidates = Candidates(rows=torch.arange(K).repeat(batch, 1), prior_logits=self.prior_logits,
                                     posterior_logits=self.posterior_logits)
        self.loglik = LIKELIHOOD.log().repeat(batch, 1).requires_grad_()  # (B, K): single-token answers

    def scores(self, request: ScoreRequest) -> Scores:
        values = self.loglik[request.example, request.slot]  # (N,)
        return Scores(token_logprobs=values.unsqueeze(-1), token_mask=torch.ones(len(values), 1, dtype=torch.bool))

    def step(self, estimator):
        """sample -> score -> update, as the loop calls them."""
        request = estimator.sample(self.batch, self.candidates)
        return estimator.update(self.batch, self.candidates, request, self.scores(request), rescore=self.scores)


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def test_chain_with_cache_converges_to_the_true_posterior():
    torch.manual_seed(0)
    jsa = Jsa(JsaOptions(proposals=5, cache=True, use="last"), ctx=None)
    problem, visits = Problem(batch=64), torch.zeros(K)
    for _ in range(150):  # each step continues every example's chain from its cached state
        jsa.extra_rows(problem.batch)
        problem.step(jsa)
        visits += torch.bincount(torch.tensor(list(jsa.cache.values())), minlength=K)
    # 9,600 correlated draws; the sampler mixes in a few moves, so TV stays well under 0.03 with seed 0
    assert total_variation(visits / visits.sum(), TRUE_POSTERIOR) < 0.03


def test_chain_without_cache_approaches_the_true_posterior_for_large_m():
    torch.manual_seed(0)
    jsa = Jsa(JsaOptions(proposals=400, cache=False, use="all", grad_pass="single"), ctx=None)
    problem = Problem(batch=32)
    problem.step(jsa).loss.backward()
    weights = -problem.loglik.grad * 32  # d loss / d log p(y|h) = -w_h / B: the chain's state frequencies
    # 12,800 states; without burn-in the first states lean towards q: TV under 0.04 at m=400 (seed 0)
    assert total_variation(weights.mean(0), TRUE_POSTERIOR) < 0.04
    assert torch.allclose(weights.sum(-1), torch.ones(32))


def test_run_chain_accepts_by_the_full_ratio():
    torch.manual_seed(0)
    log_ratio = (PRIOR * LIKELIHOOD / PROPOSAL).log().unsqueeze(0)  # (1, K)
    proposals = torch.multinomial(PROPOSAL.repeat(100, 1), 2000, replacement=True)  # (100 chains, 2000 steps)
    states, accepted = run_chain(log_ratio.repeat(100, 1), proposals, torch.full((100,), -1))
    freq = torch.bincount(states[:, 100:].flatten(), minlength=K).float() / states[:, 100:].numel()
    assert total_variation(freq, TRUE_POSTERIOR) < 0.01  # 190k states after a burn-in of 100
    assert 0 < accepted < states.numel()


@pytest.mark.parametrize("grad_pass", ["rescore", "single"])
def test_jsa_expected_gradient_matches_exact_marginal_and_inclusive_kl(grad_pass):
    torch.manual_seed(0)
    draws, problem = 20, Problem(batch=16)
    jsa = Jsa(JsaOptions(proposals=500, cache=False, grad_pass=grad_pass), ctx=None)
    for _ in range(draws):
        problem.step(jsa).loss.backward()
    scale = draws  # the loss is a mean over examples: summing rows gives the per-example mean gradient
    prior_grad = problem.prior_logits.grad.sum(0) / scale  # ∇ wrt prior logits
    posterior_grad = problem.posterior_logits.grad.sum(0) / scale
    # exact: -∇ log p(y|x) wrt prior logits = p̃ - π; wrt log p(y|h) = -π; ∇ KL(π ‖ q̃) wrt q logits = q̃ - π
    tolerance = 0.02  # 160,000 chain states in all
    assert (prior_grad - (PRIOR - TRUE_POSTERIOR)).abs().max() < tolerance
    assert (posterior_grad - (PROPOSAL - TRUE_POSTERIOR)).abs().max() < tolerance
    if grad_pass == "single":  # with rescore the gradient reaches the re-scored copies, not these leaves
        assert (problem.loglik.grad.sum(0) / scale + TRUE_POSTERIOR).abs().max() < tolerance


def test_exact_estimator_gives_the_exact_gradients():
    problem = Problem(batch=1)
    result = problem.step(Exact(ExactOptions(), ctx=None))
    result.loss.backward()
    marginal = float((PRIOR * LIKELIHOOD).sum())
    kl = float((TRUE_POSTERIOR * (TRUE_POSTERIOR / PROPOSAL).log()).sum())
    assert math.isclose(result.loss.item(), -math.log(marginal) + kl, rel_tol=1e-5)
    torch.testing.assert_close(problem.prior_logits.grad[0], PRIOR - TRUE_POSTERIOR)
    torch.testing.assert_close(problem.posterior_logits.grad[0], PROPOSAL - TRUE_POSTERIOR)
    torch.testing.assert_close(problem.loglik.grad[0], -TRUE_POSTERIOR)


@pytest.mark.parametrize("kl_over", ["posterior", "union"])
def test_vrag_elbo_is_below_the_log_likelihood_and_tight_at_the_true_posterior(kl_over):
    exact = math.log(float((PRIOR * LIKELIHOOD).sum()))
    vrag = Vrag(VragOptions(top_k=K, kl_over=kl_over), ctx=None)
    loose = Problem(batch=1).step(vrag)
    assert -loose.loss.item() == pytest.approx(loose.stats["elbo"], rel=1e-5)
    assert loose.stats["elbo"] < exact - 1e-3
    tight = Problem(batch=1, proposal=TRUE_POSTERIOR).step(vrag)
    assert tight.stats["elbo"] == pytest.approx(exact, abs=1e-5)


def test_vrag_union_kl_keeps_one_q_and_bounds_the_union_marginal():
    # C_q = the posterior's top 3 of 8; the union is all 8: the ELBO bounds log Σ_{h∈union} p̃(h) p(y|h)
    exact = math.log(float((PRIOR * LIKELIHOOD).sum()))
    union = Problem(batch=1).step(Vrag(VragOptions(top_k=3, kl_over="union"), ctx=None))
    inside = Problem(batch=1).step(Vrag(VragOptions(top_k=3, kl_over="posterior"), ctx=None))
    assert union.stats["elbo"] < exact
    top3 = PROPOSAL.topk(3).indices
    q = PROPOSAL[top3] / PROPOSAL[top3].sum()
    expected = float((q * LIKELIHOOD[top3].log()).sum() - (q * (q / PRIOR[top3]).log()).sum())  # p̃ over all 8
    assert union.stats["elbo"] == pytest.approx(expected, rel=1e-5)
    assert inside.stats["elbo"] > union.stats["elbo"]  # p̃ renormalised over C_q puts more mass where q is


def test_vrag_monte_carlo_is_unbiased_for_the_exact_elbo_gradient():
    torch.manual_seed(0)
    exact_problem = Problem(batch=1)
    Vrag(VragOptions(top_k=K), ctx=None).update(
        batch=exact_problem.batch, candidates=exact_problem.candidates,
        request=ScoreRequest.all_slots(exact_problem.candidates), scores=exact_problem.scores(
            ScoreRequest.all_slots(exact_problem.candidates)), rescore=exact_problem.scores).loss.backward()
    problem = Problem(batch=4000)
    problem.step(Vrag(VragOptions(top_k=K, samples=4), ctx=None)).loss.backward()
    mc_grad = problem.posterior_logits.grad.sum(0)  # the loss is a mean over the 4000 examples
    assert (mc_grad - exact_problem.posterior_logits.grad[0]).abs().max() < 0.02  # 16,000 samples


def test_rag_token_equals_rag_for_single_token_answers():
    a, b = Problem(batch=2), Problem(batch=2)
    rag = Rag(RagOptions(), ctx=None)
    token = RagToken(RagToken.Options(), ctx=None)
    assert math.isclose(a.step(rag).loss.item(), b.step(token).loss.item(), rel_tol=1e-6)


def test_rag_token_marginalises_each_token():
    problem = Problem(batch=1)
    two = torch.stack([LIKELIHOOD.log(), LIKELIHOOD.flip(0).log()], dim=-1)  # (K, 2) per-token log-probs
    request = ScoreRequest.all_slots(problem.candidates)
    scores = Scores(token_logprobs=two, token_mask=torch.ones(K, 2, dtype=torch.bool))
    loss = RagToken(RagToken.Options(), ctx=None).update(problem.batch, problem.candidates, request, scores,
                                                         rescore=problem.scores).loss
    expected = -(math.log(float((PRIOR * LIKELIHOOD).sum())) + math.log(float((PRIOR * LIKELIHOOD.flip(0)).sum())))
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_jsa_cache_round_trips_through_state_dict():
    torch.manual_seed(0)
    jsa = Jsa(JsaOptions(proposals=5), ctx=None)
    Problem(batch=6).step(jsa)
    restored = Jsa(JsaOptions(proposals=5), ctx=None)
    restored.load_state_dict(jsa.state_dict())
    assert restored.cache == jsa.cache and len(jsa.cache) == 6
    assert restored.extra_rows(Batch([None] * 2, [0, 99])) == [[jsa.cache[0]], []]


def test_jsa_keeps_the_cached_state_of_an_example_whose_loss_is_not_finite():
    torch.manual_seed(0)
    jsa = Jsa(JsaOptions(proposals=5), ctx=None)
    problem = Problem(batch=2)
    jsa.cache = {0: 7, 1: 7}
    with torch.no_grad():
        problem.prior_logits[1] = float("nan")  # example 1's prior diverged: its loss is NaN
    result = problem.step(jsa)
    assert not torch.isfinite(result.loss)
    assert jsa.cache[1] == 7 and 0 <= jsa.cache[0] < K  # example 0's chain moved on, example 1's state is kept
