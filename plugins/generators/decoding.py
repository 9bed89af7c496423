"""Decoding many prompts in one left-padded batch (greedy or beam search), with each answer's log-probability, and
teacher-forced scoring of given answers (RAG-Sequence decoding scores every answer under every passage)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Decoded:
    """Decoded answers and their scores under the model that produced them (``per_prompt`` answers per prompt, best
    first, prompt by prompt)."""

    texts: list[str]
    token_ids: list[list[int]]  # each answer's tokens, up to and including the first EOS
    logprob_sum: torch.Tensor  # (n,) Σ_t log p(ŷ_t | prompt, ŷ_<t), EOS included
    lengths: torch.Tensor  # (n,) answer tokens, EOS included
    per_prompt: int = 1

    def score(self, mode: str) -> torch.Tensor:
        """(n,) log p(ŷ|prompt), summed or per token."""
        return per_token(self.logprob_sum, self.lengths, mode)


def per_token(logprob_sum: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """(n,) a log-probability summed (``sum``) or divided by the answer's length (``mean``)."""
    return logprob_sum if mode == "sum" else logprob_sum / lengths.clamp(min=1)


def left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, L) input ids and attention mask of left-padded prompts."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, synced_gpus: bool) -> Decoded:
    """Decode every prompt greedily (all ranks must call this together under ZeRO-3: ``synced_gpus``)."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, ids_device(model))
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced_gpus,
        return_dict_in_generate=True, output_logits=True,
    )
    new = out.sequences[:, ids.shape[1]:]  # (n, S)
    # raw logits, not `scores` (those come after the generation config's processors, e.g. a repetition penalty)
    step_logprobs = torch.stack([torch.log_softmax(s.float(), -1) for s in out.logits], dim=1)  # (n, S, V)
    token_logprobs = step_logprobs.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (n, S)
    kept = _up_to_eos(new, tokenizer.eos_token_id)
    texts, token_ids = _texts(tokenizer, new, kept)
    return Decoded(texts, token_ids, (token_logprobs * kept).sum(-1).cpu(), kept.sum(-1).cpu())


@torch.no_grad()
def beam_search(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, synced_gpus: bool, beams: int,
                per_prompt: int = 1, score_batch: int = 64) -> Decoded:
    """Decode every prompt by beam search of width ``beams``; keep its ``per_prompt`` best answers (by the beam
    score), each scored again by a teacher-forced forward (beam scores are length-penalised and processed)."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, ids_device(model))
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, num_beams=beams, num_return_sequences=per_prompt,
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        synced_gpus=synced_gpus, return_dict_in_generate=True, early_stopping=True,
    )
    new = out.sequences[:, ids.shape[1]:]  # (n · per_prompt, S)
    kept = _up_to_eos(new, tokenizer.eos_token_id)
    texts, token_ids = _texts(tokenizer, new, kept)
    repeated = [p for p in prompts for _ in range(per_prompt)]
    logprob_sum = answer_logprobs(model, tokenizer.pad_token_id, repeated, token_ids, score_batch)
    return Decoded(texts, token_ids, logprob_sum, kept.sum(-1).cpu(), per_prompt)


@torch.no_grad()
def answer_logprobs(model, pad: int, prompts: list[list[int]], answers: list[list[int]], chunk: int) -> torch.Tensor:
    """(n,) Σ_t log p(a_t | prompt, a_<t) of each (prompt, answer) pair, teacher-forced, in forwards of ``chunk``
    pairs (the number of forwards depends only on n: under ZeRO-3 every rank must run as many)."""
    device, out = ids_device(model), []
    for start in range(0, len(prompts), chunk):
        seqs = [p + a for p, a in zip(prompts[start:start + chunk], answers[start:start + chunk])]
        span = max(1, max(len(a) for a in answers[start:start + chunk]))
        ids, mask = left_pad(seqs, pad, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       logits_to_keep=span + 1).logits[:, :-1]  # (c, span, V): predicts the last span tokens
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -span:].unsqueeze(-1)).squeeze(-1)
        lengths = torch.tensor([len(a) for a in answers[start:start + chunk]], device=device)
        answer = torch.arange(span, device=device) >= (span - lengths).unsqueeze(1)  # (c, span) right-aligned
        out.append((logprobs * answer).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _up_to_eos(new: torch.Tensor, eos: int) -> torch.Tensor:
    """(n, S) bool: the generated tokens up to and including the first EOS."""
    is_eos = new == eos
    return (is_eos.cumsum(-1) - is_eos.long()) == 0


def _texts(tokenizer, new: torch.Tensor, kept: torch.Tensor) -> tuple[list[str], list[list[int]]]:
    """The answers' texts (special tokens dropped, stripped) and token ids (EOS included)."""
    texts = [t.strip() for t in tokenizer.batch_decode(new.masked_fill(~kept, tokenizer.pad_token_id),
                                                       skip_special_tokens=True)]
    token_ids = [row[keep].tolist() for row, keep in zip(new.cpu(), kept.cpu())]
    return texts, token_ids


def ids_device(model) -> torch.device:
    """The device of a model's parameters (CPU for a ZeRO-3 partitioned model on CPU)."""
    return next(model.parameters()).device
