"""Evaluation decoding of the causal_lm generator: beam search, and RAG-Sequence's rule Σ_h p̃(h|x) p(ŷ|x,h),
checked against plain Hugging Face calls written out here (generate, and teacher-forced forwards)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import predictions_under_zero0_and_zero3, recipe_context
from jsarag.api import Batch, Candidates, Example
from jsarag.recipe import load_recipe
from jsarag_plugins.generators.causal_lm import CausalLM
from jsarag_plugins.generators.decoding import beam_search, greedy

EXAMPLES = [Example(f"e{i}", (), q, "ten minutes", ("ten minutes",), ()) for i, q in
            enumerate(["how long do i knead dough?", "can i freeze cooked rice?", "what oil for frying?"])]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory, isolated_cache):
    """The tiny GPT-2 with weights drawn at initializer_range 0.5: answers differ by passage, probabilities are
    far from uniform (a random tiny model's are nearly uniform, and every rule would pick alike)."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    from jsarag.models import resolve_model

    source, out = resolve_model("jsarag/tiny-gpt2"), tmp_path_factory.mktemp("sharp-gpt2")
    shutil.copytree(source, out, dirs_exist_ok=True)
    config = GPT2Config.from_pretrained(source)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def _generator(tiny_recipe, tmp_path, sharp, **options) -> CausalLM:
    recipe = load_recipe(tiny_recipe(generator={"model": str(sharp), "dtype": "float32", "max_new_tokens": 5,
                                                **options}))
    generator = CausalLM(recipe.generator.options, recipe_context(recipe, tmp_path / "cache", "generator"))
    generator.model.eval()
    return generator


def _candidates(k: int = 3) -> Candidates:
    rows = torch.tensor([[0, 4, 9], [2, 3, -1], [5, 1, 7]])[:, :k]  # example 1 has an empty slot
    logits = torch.tensor([[2.0, 1.5, 0.1], [0.3, 0.2, float("-inf")], [1.0, 1.0, 0.9]])[:, :k]
    return Candidates(rows=rows, prior_logits=logits)


def _teacher_forced(model, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt) by one unpadded forward."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].float(), -1)
    return float(logprobs.gather(-1, torch.tensor(answer).unsqueeze(-1)).sum())


def test_beam_search_returns_what_generate_returns_with_teacher_forced_scores(tiny_recipe, tmp_path, sharp):
    generator = _generator(tiny_recipe, tmp_path, sharp)
    batch = Batch(EXAMPLES, [0, 1, 2])
    prompts = [generator.prompt_ids(batch, e, 0) for e in range(3)]
    decoded = beam_search(generator.model, generator.tokenizer, prompts, 5, False, beams=3, per_prompt=2)
    assert len(decoded.texts) == 6 and decoded.per_prompt == 2
    eos = generator.tokenizer.eos_token_id
    for e, prompt in enumerate(prompts):  # the plain call, one prompt at a time (no padding)
        out = generator.model.generate(input_ids=torch.tensor([prompt]), num_beams=3, num_return_sequences=2,
                                       max_new_tokens=5, do_sample=False, early_stopping=True, pad_token_id=eos,
                                       eos_token_id=eos)
        for b in range(2):
            answer = out[b, len(prompt):].tolist()
            answer = answer[:answer.index(eos) + 1] if eos in answer else answer
            assert decoded.token_ids[2 * e + b] == answer
            assert float(decoded.logprob_sum[2 * e + b]) == pytest.approx(_teacher_forced(generator.model, prompt,
                                                                                          answer), abs=1e-4)
    single = beam_search(generator.model, generator.tokenizer, prompts, 5, False, beams=1)
    assert single.token_ids == greedy(generator.model, generator.tokenizer, prompts, 5, False).token_ids


@pytest.mark.parametrize("beams,score", [(1, "sum"), (2, "sum"), (2, "mean")])
def test_rag_sequence_picks_the_answer_with_the_largest_marginal(tiny_recipe, tmp_path, sharp, beams, score):
    generator = _generator(tiny_recipe, tmp_path, sharp, decode="rag_sequence", decode_k=3, beams=beams,
                           decode_score=score)
    batch, candidates = Batch(EXAMPLES, [0, 1, 2]), _candidates()
    chosen = generator.generate(batch, candidates)
    model, tokenizer = generator.model, generator.tokenizer
    log_prior = torch.log_softmax(candidates.prior_logits, -1)  # (B, k)
    for e in range(3):
        passages = [j for j in range(3) if candidates.rows[e, j] >= 0]
        prompts = {j: generator.prompt_ids(batch, e, int(candidates.rows[e, j])) for j in passages}
        offered = {}  # answer tokens -> text: each passage's `beams` best answers
        for j in passages:
            found = beam_search(model, tokenizer, [prompts[j]], 5, False, beams=max(beams, 1), per_prompt=beams) \
                if beams > 1 else greedy(model, tokenizer, [prompts[j]], 5, False)
            offered.update({tuple(ids): text for ids, text in zip(found.token_ids, found.texts)})
    
        def marginal(answer):
            terms = [log_prior[e, j] + _teacher_forced(model, prompts[j], list(answer)) / (
                len(answer) if score == "mean" else 1) for j in passages]
            return float(torch.logsumexp(torch.stack([torch.as_tensor(t) for t in terms]), 0))
        values = {answer: marginal(answer) for answer in offered}
        best = max(values, key=values.get)
        assert chosen[e] == offered[best], (e, values)
    assert len(offered) >= 2  # the last example's passages offered different answers: the rule had a choice


def test_rag_sequence_sums_over_passages_where_joint_takes_the_best_one(tiny_recipe, tmp_path, sharp):
    # passage 0 fills two slots, passage 4 one: p̃(4) is set 1.5 x p(a0|0) / p(a4|4) times each slot of passage 0, so
    # that joint's best single term is passage 4's answer a4, while a0's two terms together outweigh it
    generator = _generator(tiny_recipe, tmp_path, sharp, decode="joint", decode_score="sum", decode_k=3)
    batch = Batch(EXAMPLES[:1], [0])
    prompts = [generator.prompt_ids(batch, 0, row) for row in (0, 4)]
    found = greedy(generator.model, generator.tokenizer, prompts, 5, False)
    (a0, a4), (text0, text4) = found.token_ids, found.texts
    assert text0 != text4
    cross = [_teacher_forced(generator.model, prompts[1], a0), _teacher_forced(generator.model, prompts[0], a4)]
    gap = float(found.logprob_sum[0] - found.logprob_sum[1])  # log p(a0|0) - log p(a4|4)
    assert max(cross) < min(found.logprob_sum.tolist()) - 3  # each answer is unlikely under the other passage
    candidates = Candidates(rows=torch.tensor([[0, 0, 4]]), prior_logits=torch.tensor([[0.0, 0.0, gap + 0.405]]))
    assert generator.generate(batch, candidates) == [text4]
    generator.options = generator.options.model_copy(update={"decode": "rag_sequence"})
    assert generator.generate(batch, candidates) == [text0]


@pytest.mark.launcher
def test_rag_sequence_with_beams_decodes_alike_under_zero0_and_zero3(tiny_recipe, tmp_path):
    texts = predictions_under_zero0_and_zero3(tiny_recipe, tmp_path, {"decode": "rag_sequence", "decode_k": 2,
                                              "beams": 2, "max_new_tokens": 4}, max_examples=5)
    assert texts[0] == texts[1]
    assert any(json.loads(line)["prediction"] for line in texts[0].splitlines())
