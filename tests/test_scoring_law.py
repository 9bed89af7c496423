"""One scoring law: the generator scores a pair the same with and without gradient, on a model that has dropout.

The tiny GPT-2 has dropout 0.1 on embeddings, attention and residuals; with ``lora`` its adapters have dropout 0.5 and
their B matrices are moved off zero (at zero, adapter dropout changes nothing). The model is put in training mode, as
the DeepSpeed engine leaves it during training, and jsa's two passes (no gradient, then gradient) must agree, also
with gradient checkpointing on, which must keep checkpointing while dropout stays off.
"""
from __future__ import annotations

import pytest
import torch

from conftest import recipe_context
from jsarag.api import Batch, Candidates, Example, ScoreRequest
from jsarag.recipe import load_recipe
from jsarag_plugins.estimators.jsa import Jsa, JsaOptions
from jsarag_plugins.generators.causal_lm import CausalLM

LORA = {"r": 4, "alpha": 8, "dropout": 0.5, "target_modules": ["c_attn", "c_fc"]}
SETTINGS = [({}, "full"), ({"lora": LORA}, "lora"), ({"lora": LORA, "gradient_checkpointing": True}, "lora-ckpt")]


def _generator(tiny_recipe, tmp_path, **options) -> CausalLM:
    recipe = load_recipe(tiny_recipe(generator={"dtype": "float32", **options}))
    generator = CausalLM(recipe.generator.options, recipe_context(recipe, tmp_path / "cache", "generator"))
    torch.manual_seed(0)
    for name, param in generator.model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.normal_(std=0.2)  # moved adapters: their dropout now changes the output
    generator.model.train()  # as the engine leaves it in training
    return generator


def _batch() -> tuple[Batch, Candidates]:
    examples = [Example(f"e{i}", (), question, answer, (answer,), ()) for i, (question, answer) in
                enumerate([("how long do i knead dough?", "about ten minutes by hand"),
                           ("can i freeze cooked rice?", "yes, in a sealed bag")])]
    rows = torch.tensor([[0, 3, 5], [1, 2, 7]])
    logits = torch.zeros(2, 3, requires_grad=True)
    return Batch(examples, [0, 1]), Candidates(rows=rows, prior_logits=logits, posterior_logits=logits.clone())


@pytest.mark.parametrize("options", [s for s, _ in SETTINGS], ids=[i for _, i in SETTINGS])
def test_passes_with_and_without_gradient_score_alike_under_dropout(tiny_recipe, tmp_path, options):
    generator = _generator(tiny_recipe, tmp_path, **options)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in generator.model.modules())
    batch, candidates = _batch()
    request = ScoreRequest.all_slots(candidates, grad=False)
    seen = []  # whether each dropout module ran in training mode, at each call
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(m.training))
             for m in generator.model.modules() if isinstance(m, torch.nn.Dropout)]
    with torch.no_grad():
        first = generator.score(batch, candidates, request).token_logprobs
    scores = [generator.score(batch, candidates, ScoreRequest(request.example, request.slot, grad=True))
              for _ in range(3)]
    for hook in hooks:
        hook.remove()
    assert scores[0].token_logprobs.requires_grad
    for again in scores:
        torch.testing.assert_close(again.token_logprobs.detach(), first, rtol=0, atol=1e-5)
    assert seen and not any(seen)  # no dropout module ran in training mode
    assert all(m.training for m in generator.model.modules())  # the caller's mode is back
    if options.get("gradient_checkpointing"):  # the backward pass recomputes each layer by the same law
        assert any(getattr(m, "gradient_checkpointing", False) for m in generator.model.modules())
        plain = _generator(tiny_recipe, tmp_path, lora=LORA)
        plain.model.load_state_dict(generator.model.state_dict())
        grads = [torch.autograd.grad(g.score(batch, candidates, ScoreRequest(request.example, request.slot)).loglik()
                                     .sum(), [p for p in g.model.parameters() if p.requires_grad])
                 for g in (generator, plain)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_jsa_rescore_and_single_give_the_same_generator_gradient_under_dropout(tiny_recipe, tmp_path):
    generator = _generator(tiny_recipe, tmp_path, lora=LORA)
    params = [p for p in generator.model.parameters() if p.requires_grad]
    batch, candidates = _batch()
    gradients, losses = [], []
    for grad_pass in ("rescore", "single"):
        torch.manual_seed(3)  # the same proposals and acceptances for both
        jsa = Jsa(JsaOptions(proposals=6, grad_pass=grad_pass, cache=False), ctx=None)
        request = jsa.sample(batch, candidates)
        scores = generator.score(batch, candidates, request)
        result = jsa.update(batch, candidates, request, scores,
                            rescore=lambda again: generator.score(batch, candidates, again))
        losses.append(float(result.loss))
        gradients.append(torch.autograd.grad(result.loss, params))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for a, b in zip(*gradients):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in gradients[0])
