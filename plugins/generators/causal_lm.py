"""Generator ``causal_lm``: any Hugging Face causal LM as p(y|x,h).

Prompt = template(passage, dialog history, question); the loss is on the answer tokens only. Many
(context, passage, answer) triples are scored in few padded forwards: sequences are left-padded so every answer
ends at the last position, and only the last A+1 positions' logits are computed (``logits_to_keep``).
Scoring runs with dropout off, with or without gradient, so that the no-gradient pass and the gradient pass of an
estimator see the same log p(y|x,h) (one scoring law); layers that checkpoint activations keep doing so.

Cheaper passes, all giving the same values up to float rounding: a no-gradient pass runs under
``torch.inference_mode`` and computes once the prompt prefix that one example's pairs share (a KV cache the passages
then extend: ``share_prefix``); a request with ``keep`` records the hidden states entering the first trained layer,
and a later gradient pass on the same candidates starts there, running only the trained layers
(``reuse_frozen_layers``: LoRA on the last layers, or a frozen lower stack; see ``stack.py``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

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
from jsarag_plugins.generators.stack import FrozenStack, left_padded

log = logging.getLogger("jsarag.causal_lm")
PROMPT = (
    "Give a short answer to the Question based on relevant information given in Input.\n"
    "Input: {passage}\n{history}Question: {question}\nAnswer:"
)
PROMPT_SHARED_FIRST = (
    "Give a short answer to the Question based on relevant information given in Input.\n"
    "{history}Question: {question}\nInput: {passage}\nAnswer:"
)
LAYOUTS = {"passage_first": PROMPT, "shared_first": PROMPT_SHARED_FIRST}  # named templates `prompt` accepts
Pair = tuple[list[int], list[int]]  # (prompt ids, answer ids)


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
    """Template with {passage}, {history} and {question}; the answer follows it after a space. {history} and
    {question} go both after {passage} (this default, the reference's) or both before it; or name a built-in
    layout: ``passage_first`` (this default) or ``shared_first`` (instruction, history and question, then the
    passage: one example's prompts share everything up to the passage, which ``share_prefix`` computes once)."""
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
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel (transformers' attn_implementation): auto = transformers' default (sdpa where supported);
    flash_attention_2 needs the flash-attn package and a CUDA GPU."""
    reuse_frozen_layers: bool = True
    """When only the top layers train (LoRA last_layers, or a frozen lower stack), a gradient pass that follows a
    no-gradient one (a request with keep: jsa's rescore, exact) starts from the hidden states the no-gradient pass
    computed entering the first trained layer and runs only the trained layers (same values; off = the whole model
    again). Full fine-tuning has no frozen stack and always runs the whole model."""
    share_prefix: bool = True
    """In no-gradient passes, run the prompt tokens that one example's pairs share (the instruction; with the
    shared_first layout also the history and question) once, and each passage from that KV cache (same values up to
    float rounding). Off under ZeRO-3 with several ranks and for sliding-window models."""
    inference_mode: bool = True
    """Score without gradient under torch.inference_mode (torch.no_grad under ZeRO-3); off = torch.no_grad."""

    @field_validator("prompt")
    @classmethod
    def _named_layout(cls, value: str) -> str:
        return LAYOUTS.get(value, value)


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
        attention = _attention_kwargs(options, ctx.device)  # refused before the model loads
        with loading(options.model, "generator.model"):
            with ctx.partitioned_init():  # a frozen model too: under ZeRO-3 the engine holds it (trainable, lr 0)
                self.model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=self._dtype(), trust_remote_code=options.trust_remote_code, **attention
                ).to(ctx.device)
        _check_context(self.model.config, options)
        if options.gradient_checkpointing:
            model = self.model  # the backward pass recomputes a layer by the same scoring law as its forward
            recompute = {"use_reentrant": False, "context_fn": lambda: (contextlib.nullcontext(), scoring_mode(model))}
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=recompute)
        if options.lora is not None:
            self.model = _with_lora(self.model, options.lora)
        if options.lr == 0:
            self.model.requires_grad_(False)  # no gradient to compute, nor to accumulate in .grad for ever
        self.stack = FrozenStack.find(self.model)  # None: full fine-tuning, nothing frozen below the trained layers
        if self.stack is not None:
            log.info("causal_lm: layers 0-%d are frozen; a rescore after a no-gradient pass starts at layer %d",
                     self.stack.first - 1, self.stack.first)
        self.kept: Kept | None = None  # what a request with keep recorded for the rescore of the same candidates
        prefix, self.suffix = _split_template(options.prompt)
        self.shared_first = _fields_before_passage(prefix)
        self.prefix_ids = [] if self.shared_first else self._ids(prefix)
        self.head, self.question_part = _split_shared_first(prefix) if self.shared_first else ("", "")
        self._check_prompt_room()
        # what was cut, as distinct things so that a resumed run counts what an uninterrupted one does:
        # KB rows, and hashes of questions and answer texts
        self.truncated: dict[str, set[int]] = {"passages": set(), "questions": set(), "answers": set()}
        self.tokens_scored = self.tokens_with_grad = 0  # padded tokens in scoring forwards (cost studies)
        # token caches of this generator's own: an lru_cache on the methods would be one per class, holding every
        # generator (and its model) that the process ever built; these hold only this one (a cycle: freed by the
        # garbage collector once the generator is dropped)
        self._question_length = functools.lru_cache(maxsize=65536)(self._question_length)
        self._row_ids = functools.lru_cache(maxsize=65536)(self._row_ids)

    def tokens(self) -> tuple[int, int]:
        return self.tokens_scored, self.tokens_with_grad

    def _dtype(self) -> torch.dtype:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if self.options.dtype == "bfloat16" or (self.options.dtype == "auto" and bf16) else torch.float32

    def trainable(self) -> dict[str, Trainable]:
        if self.options.lr > 0:
            return {"generator": Trainable(self.model, self.options.lr)}
        if self.ctx.zero_stage == 3:  # frozen, but partitioned: the engine holds it without training it
            return {"generator": Trainable(self.model, 0.0)}
        return {}

    def export(self, folder: Path, adapter: bool = False) -> dict[str, Any]:
        """Write the generator as a Hugging Face folder with its tokenizer: LoRA merged into the base model, or with
        ``adapter`` the PEFT adapter alone (its adapter_config.json names the base model's folder)."""
        if adapter and self.options.lora is None:
            raise ModelError("generator.lora is null: the generator has no adapter to export alone (drop --adapter)")
        merge = self.options.lora is not None and not adapter
        (self.model.merge_and_unload() if merge else self.model).save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        return {"model": str(folder), "lora": None}

    def _check_prompt_room(self) -> None:
        """Refuse a max_prompt_tokens that leaves no room for a passage token and a question token."""
        if self.shared_first:
            fixed = len(self._ids(self.head)) + len(self._ids(self.question_part.format(question=""))) + len(
                self._ids(self.suffix))
        else:
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
        if self.shared_first:
            return self._shared_first_ids(ex.question, history, rows)
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

    def _shared_first_ids(self, question: str, history: str, rows: list[int]) -> list[int]:
        """The prompt of a template with the history and question before the passage. The passage room is the same
        as with the passage first; the question and the newest history take what a full passage leaves, whatever
        this passage's length, so that every passage of an example follows the same prefix."""
        head = self._ids(self.head)
        tail = self._ids(self.suffix)
        asked = self._ids(self.question_part.format(question=question))
        room = self.options.max_prompt_tokens - len(head) - len(tail)  # for history, question and passage
        passage_room = min(self.options.max_passage_tokens, max(room - len(asked), room // 2))
        budget = max(1, (passage_room - len(self.newline) * (len(rows) - 1)) // len(rows))
        passage = [t for i, row in enumerate(rows) for t in (self.newline if i else []) + self._passage_ids(row, budget)]
        keep = room - passage_room  # for the history and the question
        if keep < len(asked):
            self.truncated["questions"].add(text_key(question))
        asked = asked[max(0, len(asked) - keep):]
        past = self._ids(history + "\n") if history else []
        past = past[max(0, len(past) - (keep - len(asked))):]  # the newest history that fits
        return head + past + asked + passage + tail

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

    def _question_length(self, question: str) -> int:
        """Tokens of the prompt's suffix with the question and no history (cached per generator in __init__)."""
        return len(self._ids(self.suffix.format(history="", question=question)))

    def _row_ids(self, row: int) -> list[int]:
        """A passage's token ids, in full (cached per generator in __init__)."""
        return self._ids(self.ctx.kb.render(row))

    @functools.cached_property
    def newline(self) -> list[int]:
        return self._ids("\n")

    # -- scoring ------------------------------------------------------------------------------------------------------

    def score(self, batch: Batch, candidates: Candidates, request: ScoreRequest) -> Scores:
        rows = candidates.rows[request.example, request.slot].tolist()
        examples = request.example.tolist()
        pairs = [(self.prompt_ids(batch, e, r), self.answer_ids(batch.examples[e].answer)) for e, r in zip(examples, rows)]
        grad = request.grad and torch.is_grad_enabled()
        kept = self._kept_for(candidates) if grad else None
        resumed = {i for i, pair in enumerate(pairs) if kept is not None and _key(pair) in kept}
        top_groups = self._chunks(pairs, sorted(resumed))  # run from the kept states: the trained layers only
        full_groups = self._chunks(pairs, [i for i in range(len(pairs)) if i not in resumed])
        share = not grad and self._shares_prefix()
        plans = [_prefix_plan(pairs, examples, idx) if share else None for idx in full_groups]
        capture = request.keep and not grad and self.stack is not None and self.options.reuse_frozen_layers
        if capture:
            self.kept = Kept(weakref.ref(candidates), self.stack.version(), {})
        full_forwards = sum(1 if plan is None else 2 for plan in plans)
        agreed = self._forwards_on_every_rank([len(top_groups), full_forwards])  # before any forward's collectives
        with self._grad_mode(grad), scoring_mode(self.model):
            chunks = [self._score_kept(pairs, idx, kept) for idx in top_groups]
            idle = [self._idle_forward(top=True) for _ in range(agreed[0] - len(top_groups))]
            chunks += [self._score_chunk(pairs, idx, plan, capture) for idx, plan in zip(full_groups, plans)]
            idle += [self._idle_forward() for _ in range(agreed[1] - full_forwards)]
        if not pairs:
            empty = torch.zeros(0, 1, device=self.ctx.device)
            return Scores(token_logprobs=empty, token_mask=empty.bool())
        scores = _concat(chunks, len(pairs))
        for tied in idle:  # the idle forwards join the graph, so every rank's backward gathers the same parameters
            scores.token_logprobs = scores.token_logprobs + 0.0 * tied
        return scores

    def _kept_for(self, candidates: Candidates) -> dict[tuple[int, ...], torch.Tensor] | None:
        """The states a request with keep recorded for these candidates, if still valid (no frozen weight changed)."""
        kept = self.kept
        if kept is None or kept.candidates() is not candidates or not self.options.reuse_frozen_layers:
            return None
        return kept.states if kept.version == self.stack.version() else None

    def _grad_mode(self, grad: bool) -> contextlib.AbstractContextManager:
        """Gradient on, or off: inference mode where it is safe (not under ZeRO-3's parameter gathering)."""
        if grad:
            return torch.enable_grad()
        if self.options.inference_mode and self.ctx.zero_stage < 3:
            return torch.inference_mode()
        return torch.no_grad()

    def _shares_prefix(self) -> bool:
        """Whether no-gradient passes may compute one example's shared prompt prefix once (share_prefix)."""
        several_zero3 = self.ctx.zero_stage == 3 and self.ctx.world_size > 1
        return self.options.share_prefix and not several_zero3 and not getattr(self.model.config, "sliding_window",
                                                                               None)

    def _forwards_on_every_rank(self, mine: list[int]) -> list[int]:
        """The most scoring forwards of each kind (from kept states, whole model) any rank runs for this request
        (ZeRO-3: every forward is a sequence of collectives, which must match across ranks)."""
        if self.ctx.zero_stage < 3 or self.ctx.world_size == 1:
            return mine
        counts = torch.tensor(mine, device=self.ctx.device)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
        return counts.tolist()

    def _idle_forward(self, top: bool = False) -> torch.Tensor:
        """() a forward over two EOS tokens whose result is multiplied by 0: keeps ZeRO-3's collectives in step
        (``top``: a forward of the trained layers only, as from kept states)."""
        ids = torch.full((1, 2), self.tokenizer.eos_token_id, device=self.ctx.device)
        run = functools.partial(self.model, input_ids=ids, logits_to_keep=1, use_cache=False)
        if not top:
            return run().logits.float().sum()
        states = torch.zeros(1, 2, self.model.config.hidden_size, dtype=self.model.dtype, device=self.ctx.device)
        with self.stack.start_from(states):
            return run().logits.float().sum()

    def _chunks(self, pairs: list[Pair], subset: list[int]) -> list[list[int]]:
        """Split the pair indices of ``subset`` (longest first) into groups whose padded size fits
        score_batch_tokens."""
        order = sorted(subset, key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        chunks, current, width = [], [], 0
        for i in order:
            length = len(pairs[i][0]) + len(pairs[i][1])
            if current and max(width, length) * (len(current) + 1) > self.options.score_batch_tokens:
                chunks.append(current)
                current, width = [], 0
            current.append(i)
            width = max(width, length)
        return chunks + [current] if current else chunks

    def _score_chunk(self, pairs: list[Pair], idx: list[int], plan: PrefixPlan | None,
                     capture: bool) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Score one micro-batch with the whole model (the shared prefixes once, by ``plan``); with ``capture``,
        keep each pair's hidden states entering the first trained layer."""
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        span = max(len(pairs[i][1]) for i in idx)
        with self.stack.capture() if capture else contextlib.nullcontext([]) as seen:
            logits, targets = self._forward(seqs, span) if plan is None else self._forward_shared(seqs, span, plan)
        if capture:
            self._keep(seqs, seen, plan)
        return self._answer_logprobs(idx, pairs, logits, targets)

    def _score_kept(self, pairs: list[Pair], idx: list[int], kept: dict[tuple[int, ...], torch.Tensor]
                    ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Score one micro-batch from the kept states: the lower layers are not run again."""
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        states = left_padded([kept[_key(pairs[i])] for i in idx], max(map(len, seqs)))  # (n, L, d)
        with self.stack.start_from(states):
            logits, targets = self._forward(seqs, max(len(pairs[i][1]) for i in idx))
        return self._answer_logprobs(idx, pairs, logits, targets)

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, L) left-padded ids and their attention mask; the tokens are counted."""
        width, pad = max(map(len, seqs)), self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.ctx.device)  # (n, L)
        attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.ctx.device)
        self.tokens_scored += input_ids.numel()
        self.tokens_with_grad += input_ids.numel() if torch.is_grad_enabled() else 0
        return input_ids, attention

    def _forward(self, seqs: list[list[int]], span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, A, V) logits predicting the last A = ``span`` tokens of each sequence, and those (n, A) tokens."""
        input_ids, attention = self._padded(seqs)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        # no KV cache: in eval mode (scoring_mode) the model would keep one, and a checkpointing layer's recomputed
        # forward in the backward pass would append to it a second time
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                            logits_to_keep=span + 1, use_cache=False).logits[:, :-1]  # (n, A, V)
        return logits, input_ids[:, -span:]  # and the (n, A) targets: the last A tokens

    def _forward_shared(self, seqs: list[list[int]], span: int, plan: PrefixPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """``_forward`` with each group's shared prefix run once: its KV cache is copied to the group's pairs, whose
        remaining tokens (left-padded after the prefix) extend it."""
        group_of, lengths = plan
        firsts = [group_of.index(g) for g in range(len(lengths))]
        prefix_ids, prefix_mask = self._padded([seqs[first][:n] for first, n in zip(firsts, lengths)])  # (G, P)
        cache = self.model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True, logits_to_keep=1,
                           position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0)).cache
        rows = torch.tensor(group_of, device=self.ctx.device)  # (n,) each pair's group
        cache.batch_select_indices(rows)
        input_ids, attention = self._padded([s[lengths[g]:] for s, g in zip(seqs, group_of)])  # (n, S)
        offsets = torch.tensor(lengths, device=self.ctx.device)[rows]  # (n,) prefix tokens before each suffix
        positions = (attention.cumsum(-1) - 1).clamp(min=0) + offsets.unsqueeze(1)
        logits = self.model(input_ids=input_ids, attention_mask=torch.cat([prefix_mask[rows], attention], dim=1),
                            position_ids=positions, cache=cache, use_cache=True,
                            logits_to_keep=span + 1).logits[:, :-1]  # (n, A, V)
        return logits, input_ids[:, -span:]

    def _keep(self, seqs: list[list[int]], seen: list[torch.Tensor], plan: PrefixPlan | None) -> None:
        """Record each sequence's (L_i, d) hidden states entering the first trained layer, from the captured
        (n, L, d) forward input (or the (G, P, d) prefix and the (n, S, d) suffix forwards' inputs)."""
        for i, seq in enumerate(seqs):
            if plan is None:
                states = seen[0][i, seen[0].shape[1] - len(seq):]
            else:
                g, n = plan[0][i], plan[1][plan[0][i]]
                prefix, suffix = seen[0][g, seen[0].shape[1] - n:], seen[1][i, seen[1].shape[1] - (len(seq) - n):]
                states = torch.cat([prefix, suffix])
            self.kept.states[tuple(seq)] = states

    def _answer_logprobs(self, idx: list[int], pairs: list[Pair], logits: torch.Tensor, targets: torch.Tensor
                         ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """The (n, A) log-probabilities of the answer tokens, 0 on padding, and their mask."""
        answer_len = torch.tensor([len(pairs[i][1]) for i in idx], device=logits.device)  # (n,)
        span = targets.shape[1]
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = torch.arange(span, device=logits.device) >= (span - answer_len).unsqueeze(1)
        return idx, logprobs.masked_fill(~mask, 0.0), mask

    # -- decoding -----------------------------------------------------------------------------------------------------

    def generate(self, batch: Batch, candidates: Candidates) -> list[str]:
        """One answer per example (greedy or beam search), by the recipe's decoding mode; dropout off whatever mode
        the caller left the model in (`jsarag ask` has no engine to switch it to eval mode)."""
        with scoring_mode(self.model):
            return self._generate(batch, candidates)

    def _generate(self, batch: Batch, candidates: Candidates) -> list[str]:
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


@dataclass
class Kept:
    """What a request with keep recorded: per token sequence, the hidden states entering the first trained layer."""

    candidates: weakref.ref  # the Candidates they serve (a later micro-step's are other objects)
    version: int  # FrozenStack.version() when recorded: a frozen weight written since makes them stale
    states: dict[tuple[int, ...], torch.Tensor]  # prompt + answer ids -> (L, d)


PrefixPlan = tuple[list[int], list[int]]  # (per pair its group, per group the length of the prefix it shares)


def _key(pair: Pair) -> tuple[int, ...]:
    return tuple(pair[0] + pair[1])


def _prefix_plan(pairs: list[Pair], examples: list[int], idx: list[int]) -> PrefixPlan | None:
    """Group a micro-batch's pairs by example with the prefix they share (each pair keeps at least its answer and
    the token before it to run), or None where running the prefixes once saves no padded tokens."""
    seqs = [pairs[i][0] + pairs[i][1] for i in idx]
    limit = [len(s) - len(pairs[i][1]) - 1 for s, i in zip(seqs, idx)]  # prefix tokens a pair may share at most
    groups: dict[int, list[int]] = {}
    for j, i in enumerate(idx):
        groups.setdefault(examples[i], []).append(j)
    shared = {g: min([limit[j] for j in members] + [_common(seqs[members[0]], seqs[j]) for j in members[1:]])
              for g, members in groups.items() if len(members) > 1}
    if not shared or min(shared.values()) < 1:
        return None
    longest = max(shared.values())  # a lone pair of its example splits where the others do (less padding)
    lengths = [shared.get(g, min(longest, limit[members[0]])) for g, members in groups.items()]
    if min(lengths) < 1:
        return None
    group_of = [0] * len(idx)
    for g, members in enumerate(groups.values()):
        for j in members:
            group_of[j] = g
    cost = len(lengths) * max(lengths) + len(idx) * max(len(s) - lengths[g] for s, g in zip(seqs, group_of))
    return (group_of, lengths) if cost < len(idx) * max(map(len, seqs)) else None


def _common(a: list[int], b: list[int]) -> int:
    """The length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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


def _fields_before_passage(prefix: str) -> bool:
    """Whether the template puts {history} and {question} before {passage} (both: the shared-first layout) rather
    than after it (neither); a mix is refused."""
    before = [field in prefix for field in ("{history}", "{question}")]
    if any(before) and not all(before):
        raise ModelError("generator.prompt must put {history} and {question} both after {passage} or both before it")
    if all(before) and prefix.index("{history}") > prefix.index("{question}"):
        raise ModelError("generator.prompt: with the passage last, {history} must come before {question}")
    return all(before)


def _split_shared_first(prefix: str) -> tuple[str, str]:
    """The text before {passage} of a shared-first template: (the head before {history}, the part with {question})."""
    head, rest = prefix.split("{history}", 1)
    return head, rest


def _attention_kwargs(options: CausalLMOptions, device: torch.device) -> dict[str, str]:
    """from_pretrained's attn_implementation, refused (before loading) where its kernel cannot run."""
    if options.attn_implementation == "auto":
        return {}
    if options.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ModelError("generator.attn_implementation: flash_attention_2 needs the flash-attn package, which is "
                             "not installed (pip install flash-attn); use sdpa")
        if device.type != "cuda":
            raise ModelError(f"generator.attn_implementation: flash_attention_2 runs on CUDA GPUs, this run is on "
                             f"{device.type}; use sdpa")
    return {"attn_implementation": options.attn_implementation}


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
