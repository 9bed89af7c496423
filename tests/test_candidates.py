"""The framework's ``retrieve`` hook point: the candidate set is the prior's top-k ∪ the posterior's top-k ∪ the
estimator's extra rows, with both retrievers' logits over all of it, whatever retriever plugin plays each role."""
from __future__ import annotations

import pytest
import torch

from jsarag.api import Batch
from jsarag.candidates import candidate_set, ranked
from jsarag.data import render_posterior_query, render_query
from jsarag.loop import LoopState, next_batch
from jsarag.recipe import load_recipe


@pytest.fixture(scope="module")
def jsa_run(tiny_recipe_module):
    """A one-process jsa run over the tiny models (no engine): k_p = k_q = 2 of 24 passages."""
    from jsarag.run import build_run

    recipe = load_recipe(tiny_recipe_module(estimator={"name": "jsa", "proposals": 8},
                                            posterior={"lr": 1e-3, "temperature": 0.2},  # its own logit scale
                                            candidates={"prior_top_k": 2, "posterior_top_k": 2}))
    return build_run(recipe, engine=False)


def test_the_candidates_are_the_union_of_both_top_k_and_the_extra_rows(jsa_run):
    run = jsa_run
    batch = next_batch(run, LoopState())
    turns, sep = run.ctx.history_turns, run.candidates_config.posterior_sep
    with torch.no_grad():  # the posterior moves away from the prior it was copied from, as in training
        torch.manual_seed(0)
        for param in run.posterior.query_encoder.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        prior_q = run.prior.encode([render_query(ex, turns) for ex in batch.examples])
        posterior_q = run.posterior.encode([render_posterior_query(ex, turns, sep) for ex in batch.examples])
        prior_top, posterior_top = run.prior.search(prior_q, 2, True), run.posterior.search(posterior_q, 2, True)
    far = [next(r for r in range(len(run.ctx.kb)) if r not in prior_top[i].tolist() + posterior_top[i].tolist())
           for i in range(len(batch))]  # a row neither retriever ranks in its top 2
    run.estimator.cache = {p: row for p, row in zip(batch.positions, far)}  # as if a chain had ended there

    candidates = run.retrieve(batch)
    for i in range(len(batch)):
        rows = [r for r in candidates.rows[i].tolist() if r >= 0]
        assert rows == list(dict.fromkeys(prior_top[i].tolist() + posterior_top[i].tolist() + [far[i]]))
    filled = candidates.mask
    expected_prior = run.prior.score(prior_q, candidates.rows)
    expected_posterior = run.posterior.score(posterior_q, candidates.rows)
    torch.testing.assert_close(candidates.prior_logits[filled], expected_prior[filled])
    torch.testing.assert_close(candidates.posterior_logits[filled], expected_posterior[filled])
    assert torch.isneginf(candidates.prior_logits[~filled]).all()
    assert candidates.prior_logits.requires_grad and candidates.posterior_logits.requires_grad

    request = run.sample(batch, candidates)  # the chain starts from the cached state: every example a hit
    assert (request.start >= 0).all()
    assert [candidates.rows[i, request.start[i]].item() for i in range(len(batch))] == far


def test_an_estimator_without_a_posterior_gets_the_prior_top_k_only(jsa_run):
    run = jsa_run
    batch = next_batch(run, LoopState())
    rag = run.new_estimator("rag", run.plugins.component("estimator", "rag").cls.Options())
    with run.using(estimator=rag):
        candidates = run.retrieve(batch)
    assert candidates.posterior_logits is None and candidates.rows.shape == (len(batch), 2)


def test_every_passage_is_a_candidate_in_mode_all(jsa_run):
    run = jsa_run
    batch = next_batch(run, LoopState())
    with run.using(candidates=run.candidates_config.model_copy(update={"mode": "all"})):
        candidates = run.retrieve(batch)
    assert candidates.rows.tolist() == [list(range(len(run.ctx.kb)))] * len(batch)
    assert torch.isfinite(candidates.posterior_logits).all()


def test_evaluation_ranks_the_prior_top_k_best_first(jsa_run):
    run = jsa_run
    batch = Batch(list(run.eval_sets["dev"][:3]), [0, 1, 2])
    with torch.no_grad():
        top = ranked(batch, run.prior, 5, run.ctx.history_turns)
    assert top.rows.shape == (3, 5) and (top.prior_logits[:, :-1] >= top.prior_logits[:, 1:]).all()
    with torch.no_grad():
        assert torch.equal(run.rank(batch, 5).rows, top.rows)


def test_a_candidate_set_can_take_any_rows_from_any_retriever(jsa_run):
    run = jsa_run
    batch = next_batch(run, LoopState())
    config = run.candidates_config.model_copy(update={"prior_top_k": 1})
    candidates = candidate_set(batch, run.prior, None, config, len(run.ctx.kb), run.ctx.history_turns,
                               extra_rows=[[5, 7], []])
    assert candidates.rows[0, 1:].tolist() == [5, 7] and candidates.rows[1, 1:].tolist() == [-1, -1]
