"""Generator ``causal_lm``: any Hugging Face causal LM as p(y|x,h).

Prompt = template(passage, dialog history, question); the loss is on the answer tokens only. Many
(context, passage, answer) triples are scored in few padded forwards: sequences are left-padded so every answer
ends at the last position, and only the last A+1 positions' logits are computed (``logits_to_keep``).
Scoring runs with dropout off, with or without gradient, so that the no-gradient pass and the gradient pass of an
estimator see the same log p(y|x,h) (one scoring law); layers that checkpoint activations keep doing so.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field

from jsarag.api import (
    Batch,
    Candidates,
    Context,
    Generator,
    ModelError,
    Options,
    ScoreRequest,
    Scores,
    Trainable,
    Truncations,
    hookimpl,
    loading,
    render_history,
    resolve_model,
    text_key,
)
from jsarag_plugins.generators.decoding import answer_logprobs, beam_search, greedy, per_token

PROMPT = (
    "Give a short answer to the Question based on relevant information given in Input.\n"
    "Input: {passage}\n{history}Question: {question}\nAnswer:"
)


class LoraOptions(Options):
    """Low-rank adapters (peft) in place of full fine-tuning."""

    r: int = Field(8, ge=1)
    """Adapter rank."""
    alpha: int = Field(16, ge=1)
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters (peft's names; all-linear = every linear projection but the head)."""
    last_layers: int | None = Field(None, ge=1)
    """Adapt only the last N transformer layers: the backward pass stops there (cheaper); null = all layers."""


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
    """Prompt tokens kept. The question is always kept: a prompt too long loses first the oldest dialog history, then
    the end of the passage (down to half the room), then the start of the question (counted). With max_answer_tokens
    and max_new_tokens it must fit the model's context."""
    max_answer_tokens: int = Field(64, ge=1)
    """Answer tokens scored, EOS included (longer answers are truncated and counted)."""
    score_batch_tokens: int = Field(8192, ge=64)
    """Padded tokens per scoring forward: pairs are micro-batched to stay under it."""
    max_new_tokens: int = Field(32, ge=1)
    """Decoding length at evaluation (answer tokens at most)."""
    dtype: Literal["float32", "bfloat16", "auto"] = "auto"
    """Weights' dtype (auto: bfloat16 where the GPU supports it, else float32)."""
    lora: LoraOptions | None = None
    """Train low-rank adapters (e.g. {r: 8, alpha: 16}) instead of every weight; null = full fine-tuning."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    decode: Literal["top1", "joint", "concat", "rag_sequence"] = "joint"
    """Evaluation decoding: top passage only; one answer per top-k passage chosen by log p̃(h|x) + log p(ŷ|x,h);
    the top-k passages concatenated in one prompt; or RAG-Sequence's rule: among the top-k passages' answers, the ŷ
    with the largest Σ_h p̃(h|x) p(ŷ|x,h) over the top-k passages (every answer scored under every passage)."""
    decode_k: int = Field(3, ge=1)
    """Passages used by joint, concat and rag_sequence decoding."""
    decode_score: Literal["sum", "mean"] = "mean"
    """log p(ŷ|x,h) in the joint and rag_sequence scores: summed over tokens (a probability: RAG-Sequence's rule as
    published) or per token (sum favours short answers)."""
    beams: int = Field(1, ge=1)
    """Beam width of decoding (1 = greedy); with rag_sequence each passage offers its ``beams`` best answers."""
    trust_remote_code: bool = False
    """Run Python code shipped in the model folder (its config's auto_map); off unless the recipe says so."""


class CausalLM(Truncations, Generator):
    """A causal LM that scores and decodes answers given a passage."""

    Options = CausalLMOptions

    def __init__(self, options: CausalLMOptions, ctx: Context) -> None:
        super().__init__(options, ctx)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(options.model)
        with loading(options.model, "generator.model"):
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        _ensure_pad_token(self.tokenizer, options.model)
        self.tokenizer.padding_side = "left"
        with loading(options.model, "generator.model"):
            with ctx.partitioned_init() if options.lr > 0 else contextlib.nullcontext():  # a frozen model joins no engine
                self.model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=self._dtype(), trust_remote_code=options.trust_remote_code
                ).to(ctx.device)
        _check_context(self.model.config, options)
        if options.gradient_checkpointing:
            model = self.model  # the backward pass recomputes a layer by the same scoring law as its forward
            recompute = {"use_reentrant": False, "context_fn": lambda: (contextlib.nullcontext(), scoring_mode(model))}
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=recompute)
        if options.lora is not None:
            self.model = _with_lora(self.model, options.lora)
        prefix, self.suffix = _split_template(options.prompt)
        self.prefix_ids = self._ids(prefix)
        self._check_prompt_room()
        # what was cut, as distinct things so that a resumed run counts what an uninterrupted one does:
        # KB rows, and hashes of questions and answer texts
        self.truncated: dict[str, set[int]] = {"passages": set(), "questions": set(), "answers": set()}
        self.tokens_scored = self.tokens_with_grad = 0  # padded tokens in scoring forwards (cost studies)

    def tokens(self) -> tuple[int, int]:
        return self.tokens_scored, self.tokens_with_grad

    def _dtype(self) -> torch.dtype:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if self.options.dtype == "bfloat16" or (self.options.dtype == "auto" and bf16) else torch.float32

    def trainable(self) -> dict[str, Trainable]:
        return {"generator": Trainable(self.model, self.options.lr)} if self.options.lr > 0 else {}

    def _check_prompt_room(self) -> None:
        """Refuse a max_prompt_tokens that leaves no room for a passage token and a question token."""
        fixed = len(self.prefix_ids) + len(self._ids(self.suffix.format(history="", question="")))
        if fixed + 2 > self.options.max_prompt_tokens:
            raise ModelError(f"generator.max_prompt_tokens ({self.options.max_prompt_tokens}) leaves no room for a "
                             f"passage and a question: the prompt template alone takes {fixed} tokens; raise it")

    # -- prompts ------------------------------------------------------------------------------------------------------

    def prompt_ids(self, batch: Batch, example: int, rows: int | list[int]) -> list[int]:
        """Token ids of the prompt for an example and one passage (or several, concatenated), at most max_prompt_tokens:
        the oldest history goes first, then the end of the passage, then the start of the question."""
        ex = batch.examples[example]
        rows = [rows] if isinstance(rows, int) else rows
        history = render_history(ex, self.ctx.history_turns)
        suffix = self._ids(self.suffix.format(history=history + "\n" if history else "", question=ex.question))
        bare = self._question_length(ex.question)  # the suffix without history: the question is never dropped
        room = self.options.max_prompt_tokens - len(self.prefix_ids)  # for the passage and the suffix
        passage_room = min(self.options.max_passage_tokens, max(room - bare, room // 2))
        budget = max(1, (passage_room - len(self.newline) * (len(rows) - 1)) // len(rows))
        passage = [t for i, row in enumerate(rows) for t in (self.newline if i else []) + self._passage_ids(row, budget)]
        keep = room - len(passage)  # suffix tokens kept, from its end
        if keep < bare:
            self.truncated["questions"].add(text_key(ex.question))
        return self.prefix_ids + passage + suffix[max(0, len(suffix) - keep) :]

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of a target answer, ending with EOS, at most max_answer_tokens in all."""
        ids = self._ids(" " + answer.strip())
        if len(ids) >= self.options.max_answer_tokens:
            ids = ids[: self.options.max_answer_tokens - 1]
            self.truncated["answers"].add(text_key(answer))
        return ids + [self.tokenizer.eos_token_id]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _passage_ids(self, row: int, budget: int) -> list[int]:
        """A passage's token ids, truncated to ``budget`` (each truncated KB row counted once)."""
        ids = self._row_ids(row)
        if len(ids) > budget:
            self.truncated["passages"].add(row)
        return ids[:budget]

    @functools.lru_cache(maxsize=65536)
    def _question_length(self, question: str) -> int:
        """Tokens of the prompt's suffix with the question and no history."""
        return len(self._ids(self.suffix.format(history="", question=question)))

    @functools.lru_cache(maxsize=65536)
    def _row_ids(self, row: int) -> list[int]:
        """A passage's token ids, in full."""
        return self._ids(self.ctx.kb.render(row))

    @functools.cached_property
    def newline(self) -> list[int]:
        return self._ids("\n")

    # -- scoring ------------------------------------------------------------------------------------------------------

    def score(self, batch: Batch, candidates: Candidates, request: ScoreRequest) -> Scores:
        rows = candidates.rows[request.example, request.slot].tolist()
        pairs = [(self.prompt_ids(batch, e, r), self.answer_ids(batch.examples[e].answer))
                 for e, r in zip(request.example.tolist(), rows)]
        groups = self._chunks(pairs)
        forwards = self._forwards_on_every_rank(len(groups))  # agreed before any forward starts its collectives
        with torch.set_grad_enabled(request.grad and torch.is_grad_enabled()), scoring_mode(self.model):
            chunks = [self._score_chunk(pairs, idx) for idx in groups]
            idle = [self._idle_forward() for _ in range(forwards - len(groups))]
        if not pairs:
            empty = torch.zeros(0, 1, device=self.ctx.device)
            return Scores(token_logprobs=empty, token_mask=empty.bool())
        scores = _concat(chunks, len(pairs))
        for tied in idle:  # the idle forwards join the graph, so every rank's backward gathers the same parameters
            scores.token_logprobs = scores.token_logprobs + 0.0 * tied
        return scores

    def _forwards_on_every_rank(self, mine: int) -> int:
        """The most scoring forwards any rank runs for this request (ZeRO-3: every forward is a collective)."""
        if self.ctx.zero_stage < 3 or self.ctx.world_size == 1:
            return mine
        count = torch.tensor([mine], device=self.ctx.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return int(count.item())

    def _idle_forward(self) -> torch.Tensor:
        """() a forward over two EOS tokens whose result is multiplied by 0: keeps ZeRO-3's collectives in step."""
        ids = torch.full((1, 2), self.tokenizer.eos_token_id, device=self.ctx.device)
        return self.model(input_ids=ids, logits_to_keep=1, use_cache=False).logits.float().sum()

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
        self.tokens_scored += input_ids.numel()
        self.tokens_with_grad += input_ids.numel() if torch.is_grad_enabled() else 0
        attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.ctx.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        # no KV cache: in eval mode (scoring_mode) the model would keep one, and a checkpointing layer's recomputed
        # forward in the backward pass would append to it a second time
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False,
                            logits_to_keep=span + 1).logits[:, :-1]  # (n, A, V): predicts the last A tokens
        targets = input_ids[:, -span:]  # (n, A)
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = torch.arange(span, device=logits.device) >= (span - answer_len.to(logits.device)).unsqueeze(1)
        return idx, logprobs.masked_fill(~mask, 0.0), mask

    # -- decoding -----------------------------------------------------------------------------------------------------

    def generate(self, batch: Batch, candidates: Candidates) -> list[str]:
        """One answer per example (greedy or beam search), by the recipe's decoding mode."""
        k = min(self.options.decode_k, candidates.rows.shape[1])
        decode = self._decoder()
        if self.options.decode == "rag_sequence":
            return self._rag_sequence(batch, candidates, k)
        if self.options.decode == "top1":
            return decode([self.prompt_ids(batch, e, int(candidates.rows[e, 0])) for e in range(len(batch))]).texts
        if self.options.decode == "concat":
            top = [[r for r in candidates.rows[e, :k].tolist() if r >= 0] for e in range(len(batch))]
            return decode([self.prompt_ids(batch, e, rows) for e, rows in enumerate(top)]).texts
        return self._joint(batch, candidates, k, decode)

    def _joint(self, batch: Batch, candidates: Candidates, k: int, decode) -> list[str]:
        """Decode per top-k passage; keep the answer with the best log p̃(h|x) + log p(ŷ|x,h)."""
        prompts = [self.prompt_ids(batch, e, max(int(candidates.rows[e, j]), 0)) for e in range(len(batch)) for j in range(k)]
        decoded = decode(prompts)
        prior = candidates.prior_log_probs()[:, :k].detach().float().cpu()  # (B, k) over the ranked list
        joint = prior + decoded.score(self.options.decode_score).view(len(batch), k)  # (B, k)
        joint = joint.masked_fill(~candidates.mask[:, :k].cpu(), float("-inf"))
        best = joint.argmax(-1).tolist()
        return [decoded.texts[e * k + j] for e, j in enumerate(best)]

    def _rag_sequence(self, batch: Batch, candidates: Candidates, k: int) -> list[str]:
        """Decode per top-k passage (its ``beams`` best answers), score every answer under every top-k passage, keep
        the answer with the best log Σ_h p̃(h|x) p(ŷ|x,h) (RAG-Sequence's thorough decoding)."""
        n, filled = len(batch), candidates.mask[:, :k].cpu()  # (B, k)
        prompts = [[self.prompt_ids(batch, e, max(int(candidates.rows[e, j]), 0)) for j in range(k)] for e in range(n)]
        decoded = self._decoder(per_prompt=self.options.beams)([p for row in prompts for p in row])
        answers = k * decoded.per_prompt  # candidate answers per example, passage by passage
        pairs = [(prompts[e][j], decoded.token_ids[e * answers + a]) for e in range(n) for a in range(answers)
                 for j in range(k)]
        chunk = max(1, self.options.score_batch_tokens // (self.options.max_prompt_tokens + self.options.max_new_tokens))
        logprobs = answer_logprobs(self.model, self.tokenizer.pad_token_id, [p for p, _ in pairs], [a for _, a in pairs],
                                   chunk)  # the same number of forwards on every rank (ZeRO-3)
        lengths = torch.tensor([len(a) for _, a in pairs])
        scores = per_token(logprobs, lengths, self.options.decode_score).view(n, answers, k)  # (B, A, k)
        prior = candidates.prior_log_probs()[:, :k].detach().float().cpu().masked_fill(~filled, float("-inf"))
        marginal = torch.logsumexp(prior.unsqueeze(1) + scores, dim=-1)  # (B, A) log Σ_h p̃(h|x) p(ŷ|x,h)
        offered = filled.repeat_interleave(decoded.per_prompt, dim=1)  # (B, A): answers decoded from a real passage
        best = marginal.masked_fill(~offered, float("-inf")).argmax(-1).tolist()
        return [decoded.texts[e * answers + a] for e, a in enumerate(best)]

    def _decoder(self, per_prompt: int = 1):
        """decode(prompts) -> Decoded: greedy, or beam search keeping ``per_prompt`` answers per prompt."""
        synced = self.ctx.zero_stage == 3 and self.ctx.world_size > 1
        common = dict(max_new_tokens=self.options.max_new_tokens, synced_gpus=synced)
        if self.options.beams == 1:
            return functools.partial(greedy, self.model, self.tokenizer, **common)
        chunk = max(1, self.options.score_batch_tokens // (self.options.max_prompt_tokens + self.options.max_new_tokens))
        return functools.partial(beam_search, self.model, self.tokenizer, beams=self.options.beams,
                                 per_prompt=per_prompt, score_batch=chunk, **common)


@contextlib.contextmanager
def scoring_mode(model: torch.nn.Module) -> Iterator[None]:
    """Score with dropout off (eval mode) whatever the engine's mode; layers that checkpoint activations keep their
    own training flag, which is what turns checkpointing on (their submodules, dropout included, stay in eval)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    for module, training in modes:
        if training and isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True  # not .train(): that would switch its submodules' dropout back on
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _split_template(template: str) -> tuple[str, str]:
    """Split the prompt template at {passage}: (text before, text after)."""
    if template.count("{passage}") != 1:
        raise ModelError("generator.prompt must contain {passage} exactly once")
    prefix, suffix = template.split("{passage}")
    return prefix, suffix


def _check_context(config, options: CausalLMOptions) -> None:
    """Refuse prompt and answer budgets longer than the model's context (when its config states one)."""
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = options.max_prompt_tokens + max(options.max_answer_tokens, options.max_new_tokens)
    if isinstance(context, int) and longest > context:
        raise ModelError(
            f"generator.max_prompt_tokens ({options.max_prompt_tokens}) + generator.max_answer_tokens "
            f"({options.max_answer_tokens}) or generator.max_new_tokens ({options.max_new_tokens}) is {longest} "
            f"tokens, more than the context of {options.model} ({context}); lower them")


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


def _with_lora(model, lora: LoraOptions):
    """Wrap a model with peft LoRA adapters: only the adapters train."""
    from peft import LoraConfig, get_peft_model

    layers, targets = None, lora.target_modules
    if lora.last_layers is not None:
        total = model.config.num_hidden_layers
        layers = list(range(max(0, total - lora.last_layers), total))
        if targets == "all-linear":  # peft needs explicit names together with layers_to_transform
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and "lm_head" not in name})
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        layers_to_transform=layers, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@hookimpl
def register_generators(register) -> None:
    register("causal_lm", CausalLM)
