"""Greedy decoding of many prompts in one left-padded batch, with each answer's log-probability."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Decoded:
    """Greedy answers and their scores under the model that produced them."""

    texts: list[str]
    logprob_sum: torch.Tensor  # (n,) Σ_t log p(ŷ_t | prompt, ŷ_<t), EOS included
    lengths: torch.Tensor  # (n,) answer tokens, EOS included

    def score(self, mode: str) -> torch.Tensor:
        """(n,) log p(ŷ|prompt), summed or per token."""
        return self.logprob_sum if mode == "sum" else self.logprob_sum / self.lengths.clamp(min=1)


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
    is_eos = new == tokenizer.eos_token_id
    before_eos = (is_eos.cumsum(-1) - is_eos.long()) == 0  # tokens up to and including the first EOS
    texts = [t.strip() for t in tokenizer.batch_decode(new.masked_fill(~before_eos, tokenizer.pad_token_id),
                                                       skip_special_tokens=True)]
    return Decoded(texts, (token_logprobs * before_eos).sum(-1).cpu(), before_eos.sum(-1).cpu())


def ids_device(model) -> torch.device:
    """The device of a model's parameters (CPU for a ZeRO-3 partitioned model on CPU)."""
    return next(model.parameters()).device
