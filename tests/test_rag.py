"""The `rag` estimator's loss equals a hand-computed value, and its gradient the exact formula's."""
from __future__ import annotations

import math

import torch

from jsarag.api import Candidates, ScoreRequest, Scores
from jsarag_plugins.estimators.rag import Rag, RagOptions

PRIOR = [0.5, 0.3, 0.2]  # p̃(h|x) over 3 passages
LIKELIHOOD = [0.1, 0.4, 0.2]  # p(y|x,h)


def _inputs():
    prior_logits = torch.tensor([PRIOR]).log().requires_grad_()  # (1, 3): softmax gives back PRIOR
    loglik = torch.tensor(LIKELIHOOD).log().requires_grad_()  # (3,) one single-token answer per passage
    candidates = Candidates(rows=torch.tensor([[7, 3, 5]]), prior_logits=prior_logits)
    request = ScoreRequest.all_slots(candidates)
    scores = Scores(token_logprobs=loglik.unsqueeze(-1), token_mask=torch.ones(3, 1, dtype=torch.bool))
    return candidates, request, scores, prior_logits, loglik


def test_loss_equals_hand_computed_value():
    candidates, request, scores, _, _ = _inputs()
    result = Rag(RagOptions(), ctx=None).update(batch=None, candidates=candidates, request=request, scores=scores, rescore=None)
    # p(y|x) = 0.5*0.1 + 0.3*0.4 + 0.2*0.2 = 0.21
    assert math.isclose(result.loss.item(), -math.log(0.21), rel_tol=1e-6)


def test_gradient_matches_autograd_of_the_exact_formula():
    candidates, request, scores, prior_logits, loglik = _inputs()
    Rag(RagOptions(), ctx=None).update(batch=None, candidates=candidates, request=request, scores=scores, rescore=None).loss.backward()

    ref_logits = prior_logits.detach().clone().requires_grad_()
    ref_loglik = loglik.detach().clone().requires_grad_()
    exact = -torch.log((torch.softmax(ref_logits, -1)[0] * ref_loglik.exp()).sum())
    exact.backward()
    torch.testing.assert_close(prior_logits.grad, ref_logits.grad)
    torch.testing.assert_close(loglik.grad, ref_loglik.grad)
    # and by hand: d/dlogit_j = p̃_j - r_j, d/dlog p(y|h_j) = -r_j with r_j = p̃_j p(y|h_j) / p(y|x)
    posterior = torch.tensor(PRIOR) * torch.tensor(LIKELIHOOD) / 0.21
    torch.testing.assert_close(prior_logits.grad[0], torch.tensor(PRIOR) - posterior)
    torch.testing.assert_close(loglik.grad, -posterior)


def test_mean_likelihood_divides_by_answer_length():
    candidates, request, _, _, _ = _inputs()
    two_tokens = torch.tensor([LIKELIHOOD, LIKELIHOOD]).T.log()  # (3, 2): each answer twice as long
    scores = Scores(token_logprobs=two_tokens, token_mask=torch.ones(3, 2, dtype=torch.bool))
    mean = Rag(RagOptions(likelihood="mean"), ctx=None).update(None, candidates, request, scores, None).loss
    total = Rag(RagOptions(likelihood="sum"), ctx=None).update(None, candidates, request, scores, None).loss
    assert math.isclose(mean.item(), -math.log(0.21), rel_tol=1e-6)
    assert total.item() > mean.item()
