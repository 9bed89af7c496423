"""Generator ``causal_lm``: any Hugging Face causal LM as p(y|x,h).

Prompt = template(passage, dialog history, question); the loss is on the answer tokens only. Many
(context, passage, answer) triples are scored in few padded forwards: sequences are left-padded so every answer
ends at the last position, and only the last A+1 positions' logits are computed (``logits_to_keep``).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from transformers import AutoModelForCausalLM, AutoTokenizer

from jsarag import hookimpl
from jsarag.components import Component, Options, RunContext, Trainable
from jsarag.data import render_history
from jsarag.errors import ModelError
from jsarag.models import resolve_model
from jsarag.types import Batch, Candidates, ScoreRequest, Scores

PROMPT = (
    "Give a short answer to the Question based on relevant information given in Input.\n"
    "Input: {passage}\n{history}Question: {question}\nAnswer:"
)


class CausalLMOptions(Options):
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """A model name (resolved: local path, HF cache, packaged offline copy, hub) or a folder."""
    lr: float = Field(2e-5, ge=0)
    """Learning rate of the generator."""
    prompt: str = PROMPT
    """Template with {passage}, {history} and {question}; the answer follows it after a space."""
    max_passage_tokens: int = Field(256, ge=1)
    """Passage tokens kept in the prompt (longer passages are truncated and counted)."""
    max_prompt_tokens: int = Field(512, ge=8)
    """Prompt tokens kept (the start of the text after the passage is cut first)."""
    max_answer_tokens: int = Field(64, ge=1)
    """Answer tokens scored (longer answers are truncated and counted)."""
    score_batch_tokens: int = Field(8192, ge=64)
    """Padded tokens per scoring forward: pairs are micro-batched to stay under it."""
    max_new_tokens: int = Field(32, ge=1)
    """Greedy decoding length at evaluation."""
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """Weights' dtype (auto: bfloat16 where the GPU supports it)."""
    trust_remote_code: bool = False
    """Run code shipped in the model folder (off unless the recipe says so)."""


class CausalLM(Component):
    """A causal LM that scores and decodes answers given a passage."""

    kind = "generator"
    Options = CausalLMOptions

    def __init__(self, options: CausalLMOptions, ctx: RunContext) -> None:
        super().__init__(options, ctx)
        path = resolve_model(options.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        _ensure_pad_token(self.tokenizer, options.model)
        self.tokenizer.padding_side = "left"
        with ctx.partitioned_init():
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=self._dtype(), trust_remote_code=options.trust_remote_code
            ).to(ctx.device)
        prefix, self.suffix = _split_template(options.prompt)
        self.prefix_ids = self._ids(prefix)
        self.truncated = {"passages": 0, "answers": 0}

    def _dtype(self) -> torch.dtype:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if self.options.dtype == "bfloat16" or (self.options.dtype == "auto" and bf16) else torch.float32

    def trainable(self) -> dict[str, Trainable]:
        return {"generator": Trainable(self.model, self.options.lr)} if self.options.lr > 0 else {}

    # -- prompts ------------------------------------------------------------------------------------------------------

    def prompt_ids(self, batch: Batch, example: int, row: int) -> list[int]:
        """Token ids of the prompt for one (example, passage) pair."""
        ex = batch.examples[example]
        passage = self._ids(self.ctx.kb.render(row))
        if len(passage) > self.options.max_passage_tokens:
            passage = passage[: self.options.max_passage_tokens]
            self.truncated["passages"] += 1
        history = render_history(ex, self.ctx.recipe.data.max_history_turns)
        suffix = self._ids(self.suffix.format(history=history + "\n" if history else "", question=ex.question))
        room = self.options.max_prompt_tokens - len(self.prefix_ids) - len(passage)
        return self.prefix_ids + passage + suffix[max(0, len(suffix) - room) :]

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of a target answer, ending with EOS."""
        ids = self._ids(" " + answer.strip())
        if len(ids) >= self.options.max_answer_tokens:
            ids = ids[: self.options.max_answer_tokens - 1]
            self.truncated["answers"] += 1
        return ids + [self.tokenizer.eos_token_id]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- scoring ------------------------------------------------------------------------------------------------------

    @hookimpl
    def score(self, batch: Batch, candidates: Candidates, request: ScoreRequest) -> Scores:
        rows = candidates.rows[request.example, request.slot].tolist()
        pairs = [(self.prompt_ids(batch, e, r), self.answer_ids(batch.examples[e].answer))
                 for e, r in zip(request.example.tolist(), rows)]
        if not pairs:
            empty = torch.zeros(0, 1, device=self.ctx.device)
            return Scores(token_logprobs=empty, token_mask=empty.bool())
        with torch.set_grad_enabled(request.grad and torch.is_grad_enabled()):
            chunks = [self._score_chunk(pairs, idx) for idx in self._chunks(pairs)]
        return _concat(chunks, len(pairs))

    def _chunks(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[int]]:
        """Split pair indices (longest first) into groups whose padded size fits score_batch_tokens."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        chunks, current, width = [], [], 0
        for i in order:
            length = len(pairs[i][0]) + len(pairs[i][1])
            if current and max(width, length) * (len(current) + 1) > self.options.score_batch_tokens:
                chunks.append(current)
                current, width = [], 0
            current.append(i)
            width = max(width, length)
        return chunks + [current] if current else chunks

    def _score_chunk(self, pairs, idx: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        answer_len = torch.tensor([len(pairs[i][1]) for i in idx])  # (n,)
        width, span = max(map(len, seqs)), int(answer_len.max())
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.ctx.device)  # (n, L)
        attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.ctx.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                            logits_to_keep=span + 1).logits[:, :-1]  # (n, A, V): predicts the last A tokens
        targets = input_ids[:, -span:]  # (n, A)
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = torch.arange(span, device=logits.device) >= (span - answer_len.to(logits.device)).unsqueeze(1)
        return idx, logprobs.masked_fill(~mask, 0.0), mask

    # -- decoding -----------------------------------------------------------------------------------------------------

    @hookimpl
    def generate(self, batch: Batch, candidates: Candidates) -> list[str]:
        """Greedy answer per example from the prior's top passage."""
        prompts = [self.prompt_ids(batch, e, int(candidates.rows[e, 0])) for e in range(len(batch))]
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.ctx.device)
        attention = (torch.arange(width).unsqueeze(0) >= torch.tensor([width - len(p) for p in prompts]).unsqueeze(1))
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention.long().to(self.ctx.device), do_sample=False,
                max_new_tokens=self.options.max_new_tokens, pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
                synced_gpus=self.ctx.zero_stage == 3 and self.ctx.world_size > 1,
            )
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]


def _split_template(template: str) -> tuple[str, str]:
    """Split the prompt template at {passage}: (text before, text after)."""
    if template.count("{passage}") != 1:
        raise ModelError("generator.prompt must contain {passage} exactly once")
    prefix, suffix = template.split("{passage}")
    return prefix, suffix


def _ensure_pad_token(tokenizer, name: str) -> None:
    """Use EOS as padding when the tokenizer has no pad token; refuse a tokenizer with neither."""
    if tokenizer.eos_token_id is None:
        raise ModelError(f"generator {name}: the tokenizer has no EOS token to end answers with")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _concat(chunks, n: int) -> Scores:
    """Put chunk results back in request order, right-aligned to a common answer width."""
    span = max(lp.shape[1] for _, lp, _ in chunks)
    device = chunks[0][1].device
    logprobs = torch.zeros(n, span, device=device)
    mask = torch.zeros(n, span, dtype=torch.bool, device=device)
    for idx, lp, m in chunks:
        rows = torch.tensor(idx, device=device)
        logprobs = logprobs.index_put((rows,), torch.nn.functional.pad(lp, (span - lp.shape[1], 0)))
        mask[rows] = torch.nn.functional.pad(m, (span - m.shape[1], 0))
    return Scores(token_logprobs=logprobs, token_mask=mask)


@hookimpl
def register_generators(register) -> None:
    register("causal_lm", CausalLM)
