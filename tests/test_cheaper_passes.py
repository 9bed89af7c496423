"""The generator's cheaper passes give today's values and gradients: a gradient pass started from the kept hidden
states of the frozen lower layers (LoRA on the last layers), and a no-gradient pass that runs one example's shared
prompt prefix once. Tiny models built from a config: the GPT-2 (learned positions) and a Llama (rotary, RMSNorm,
the SmolLM2 architecture), each with LoRA on its last layer(s)."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import recipe_context
from jsarag.api import Batch, Candidates, ScoreRequest
from jsarag.models import resolve_model
from jsarag.recipe import load_recipe
from jsarag_plugins.generators.causal_lm import PROMPT_SHARED_FIRST, CausalLM
from jsarag_plugins.generators.stack import FrozenStack

ROWS = [[0, 3, 5, 7], [1, 2, 5, 11]]  # two examples, four candidate passages each (row 5 in both)
GPT2_LORA = {"r": 4, "last_layers": 1, "target_modules": ["c_attn", "c_proj", "c_fc"]}  # GPT-2's Conv1D layers
TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32 values: the padded widths of the two passes differ


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, isolated_cache):
    """A 4-layer Llama with the tiny GPT-2's tokenizer, random weights (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    source, out = resolve_model("jsarag/tiny-gpt2"), tmp_path_factory.mktemp("tiny-llama")
    for name in source.iterdir():
        if "token" in name.name or name.name in ("vocab.txt", "special_tokens_map.json"):
            shutil.copy(name, out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True, initializer_range=0.1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _generator(tiny_recipe, tmp_path, **options) -> CausalLM:
    recipe = load_recipe(tiny_recipe(generator=options))
    torch.manual_seed(0)  # the same LoRA initialisation in every generator built
    generator = CausalLM(recipe.generator.options, recipe_context(recipe, tmp_path / "cache", "generator"))
    with torch.no_grad():  # LoRA's B starts at zero: move it, so the adapters change the scores
        for name, p in generator.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return generator


def _inputs(generator: CausalLM) -> tuple[Batch, Candidates]:
    from jsarag.data import load_examples

    examples = list(load_examples(generator.ctx.kb.path.parent / "train.jsonl", generator.ctx.kb))[:2]
    rows = torch.tensor(ROWS)
    return Batch(examples=examples, positions=[0, 1]), Candidates(rows=rows, prior_logits=torch.zeros(rows.shape))


def _trained(generator: CausalLM) -> list[torch.nn.Parameter]:
    return [p for p in generator.model.parameters() if p.requires_grad]


def _lower_layer_runs(generator: CausalLM) -> list[int]:
    """A counter of the forwards that ran the lowest layer's MLP (not run when a pass starts from kept states)."""
    runs = [0]
    layer = generator.stack.layers[0]
    mlp = next(m for name, m in layer.named_children() if name == "mlp")
    mlp.register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    return runs


def _rescore(generator: CausalLM, batch: Batch, candidates: Candidates, keep: bool, runs: list[int]):
    """A no-gradient pass over every pair (with keep or not), then a gradient pass over four of them: (their token
    log-probabilities, the gradients of their summed log-likelihood, the no-gradient pass's scores, how often the
    gradient pass ran the lowest layer)."""
    first = generator.score(batch, candidates, ScoreRequest.all_slots(candidates, grad=False, keep=keep))
    before = runs[0]
    again = ScoreRequest.where(torch.tensor([[True, False, True, False], [False, True, False, True]]))
    scores = generator.score(batch, candidates, again)
    grads = torch.autograd.grad(-scores.loglik().sum(), _trained(generator))
    return scores.token_logprobs.detach(), grads, first, runs[0] - before


@pytest.mark.parametrize("model,last,share", [("jsarag/tiny-gpt2", 1, True), ("jsarag/tiny-gpt2", 1, False),
                                              ("llama", 2, True)])
def test_a_rescore_from_the_kept_states_equals_the_full_rescore(tiny_recipe, tmp_path, tiny_llama, model, last,
                                                                share):
    name, lora = (str(tiny_llama), {"r": 4, "last_layers": last}) if model == "llama" else (model, GPT2_LORA)
    generator = _generator(tiny_recipe, tmp_path, model=name, lora=lora, dtype="float32", share_prefix=share)
    assert generator.stack is not None and generator.stack.first == len(generator.stack.layers) - last
    batch, candidates = _inputs(generator)
    runs = _lower_layer_runs(generator)
    values, grads, first, lower = _rescore(generator, batch, candidates, True, runs)
    assert len(generator.kept.states) == 8 and lower == 0  # the rescore did not run the lower layers again
    generator.kept = None
    reference, ref_grads, ref_first, lower = _rescore(generator, batch, candidates, False, runs)
    assert lower == 1  # the whole model
    torch.testing.assert_close(first.token_logprobs, ref_first.token_logprobs, **TOLERANCE)
    torch.testing.assert_close(values, reference, **TOLERANCE)
    assert len(grads) == len(ref_grads) > 0
    scale = max(float(ref.abs().max()) for ref in ref_grads)
    assert scale > 1e-3
    for g, ref in zip(grads, ref_grads):  # float32 sums over ~100 answer tokens: 1e-4 of the largest gradient
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4 * scale)


def test_kept_states_are_not_reused_after_a_frozen_weight_changes(tiny_recipe, tmp_path):
    generator = _generator(tiny_recipe, tmp_path, lora=GPT2_LORA, dtype="float32")
    batch, candidates = _inputs(generator)
    generator.score(batch, candidates, ScoreRequest.all_slots(candidates, grad=False, keep=True))
    frozen = generator.stack.layers[0].mlp.c_fc.weight  # below the first trained layer (no adapter)
    with torch.no_grad():
        frozen.mul_(1.5)
    again = ScoreRequest.where(candidates.mask)
    guarded = generator.score(batch, candidates, again).token_logprobs.detach()
    generator.kept = None
    fresh = generator.score(batch, candidates, again).token_logprobs.detach()
    torch.testing.assert_close(guarded, fresh, **TOLERANCE)


def test_kept_states_serve_only_the_candidates_they_were_kept_for(tiny_recipe, tmp_path):
    generator = _generator(tiny_recipe, tmp_path, lora=GPT2_LORA, dtype="float32")
    batch, candidates = _inputs(generator)
    runs = _lower_layer_runs(generator)
    generator.score(batch, candidates, ScoreRequest.all_slots(candidates, grad=False, keep=True))
    other = Candidates(rows=candidates.rows.clone(), prior_logits=candidates.prior_logits)  # the next micro-step's
    before = runs[0]
    generator.score(batch, other, ScoreRequest.all_slots(other))
    assert runs[0] == before + 1  # rag's pass on other candidates ran the whole model
    generator.score(batch, candidates, ScoreRequest.all_slots(candidates))
    assert runs[0] == before + 1  # a rescore on the kept candidates did not
    del candidates
    assert generator.kept.candidates() is None  # the kept states serve no later micro-step


def test_full_fine_tuning_has_no_frozen_stack(tiny_recipe, tmp_path):
    generator = _generator(tiny_recipe, tmp_path, dtype="float32")
    assert generator.stack is None
    batch, candidates = _inputs(generator)
    generator.score(batch, candidates, ScoreRequest.all_slots(candidates, grad=False, keep=True))
    assert generator.kept is None  # nothing recorded: the rescore runs the whole model


def test_a_lora_on_every_layer_has_no_frozen_stack(tiny_recipe, tmp_path):
    generator = _generator(tiny_recipe, tmp_path, lora={**GPT2_LORA, "last_layers": None})
    assert FrozenStack.find(generator.model) is None


@pytest.mark.parametrize("prompt", ["passage_first", PROMPT_SHARED_FIRST])
def test_sharing_the_prompt_prefix_gives_the_same_no_gradient_scores(tiny_recipe, tmp_path, prompt):
    shared = _generator(tiny_recipe, tmp_path, prompt=prompt, dtype="float32")
    batch, candidates = _inputs(shared)
    request = ScoreRequest.all_slots(candidates, grad=False)
    values = shared.score(batch, candidates, request).token_logprobs
    tokens = shared.tokens()[0]
    shared.options = shared.options.model_copy(update={"share_prefix": False})
    plain = shared.score(batch, candidates, request).token_logprobs
    assert shared.tokens()[0] - tokens > tokens  # the shared prefix was run once per example, not per pair
    torch.testing.assert_close(values, plain, **TOLERANCE)


# ---------------------------------------------------------------------------------------------------------------------
# exact: no-gradient scores, then the posterior-weighted surrogate re-scored in checkpointed chunks


@pytest.fixture(scope="module")
def exact_run(tiny_recipe_module):
    """The tiny recipe with the exact estimator over all 24 passages, LoRA on the generator's last layer."""
    from jsarag.run import build_run

    recipe = load_recipe(tiny_recipe_module(estimator={"name": "exact", "grad_chunk": 5}, posterior={"lr": 1e-3},
                                            candidates={"mode": "all"},
                                            generator={"lora": GPT2_LORA, "dtype": "float32"}))
    return build_run(recipe, engine=False)


def _exact_gradients(run, one_pass: bool) -> tuple[float, list[torch.Tensor]]:
    """The exact estimator's loss and gradients on the first two training examples: as it runs (no-gradient scores
    then chunks), or from one gradient-carrying pass over every pair (how it ran before)."""
    params = _params(run)
    batch = Batch(examples=list(run.train_set[:2]), positions=[0, 1])
    candidates = run.retrieve(batch)
    request = ScoreRequest.all_slots(candidates) if one_pass else run.sample(batch, candidates)
    result = run.update(batch, candidates, request, run.score(batch, candidates, request))
    grads = torch.autograd.grad(result.loss, params, allow_unused=True)  # (the prior's unused pooler: None)
    return result.loss.item(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def test_exact_in_chunks_gives_the_one_pass_loss_and_gradients(exact_run):
    assert exact_run.sample(*_batch_and_candidates(exact_run)).keep  # it asks the generator to keep its states
    with torch.no_grad():  # LoRA's B starts at zero: move it, so the generator's gradient is not LoRA-A only
        for name, p in exact_run.generator.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    loss, grads = _exact_gradients(exact_run, one_pass=False)
    ref_loss, ref_grads = _exact_gradients(exact_run, one_pass=True)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for g, ref in zip(grads, ref_grads):
        scale = float(ref.abs().max())
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4 * scale + 1e-12)
    generator = {id(p) for p in exact_run.generator.model.parameters() if p.requires_grad}
    assert sum(id(p) in generator for p in _params(exact_run)) == len(generator) > 0
    assert all(float(ref.abs().max()) > 0 for p, ref in zip(_params(exact_run), ref_grads) if id(p) in generator)


def _params(run) -> list[torch.nn.Parameter]:
    from jsarag.run import trainables

    return [p for modules in trainables(run).values() for t in modules.values() for p in t.module.parameters()
            if p.requires_grad]


def _batch_and_candidates(run) -> tuple[Batch, Candidates]:
    batch = Batch(examples=list(run.train_set[:2]), positions=[0, 1])
    return batch, run.retrieve(batch)


def test_a_dropped_generator_is_freed_with_its_token_caches(tiny_recipe, tmp_path):
    """The token caches that spare re-tokenising passages and questions belong to one generator: once it is dropped,
    the garbage collector frees it and its model. A cache on the class would keep every generator a process built
    alive (each run of `jsarag.cli.run` in a notebook or a test process, each estimator a bench builds)."""
    import gc
    import weakref

    generator = _generator(tiny_recipe, tmp_path)
    batch, candidates = _inputs(generator)
    generator.score(batch, candidates, ScoreRequest.all_slots(candidates, grad=False))
    assert generator._row_ids.cache_info().currsize == len(set(sum(ROWS, [])))  # every candidate passage, once
    assert generator._question_length.cache_info().currsize == len(batch)
    model = weakref.ref(generator.model)
    del generator
    gc.collect()
    assert model() is None, [type(r).__name__ for r in gc.get_referrers(model())]
