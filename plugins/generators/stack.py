"""The frozen lower stack of a causal LM: the decoder layers below its first trained layer, when nothing else below
that layer trains (LoRA on the last layers, or lower layers frozen by hand).

Their output, the hidden states entering the first trained layer, is the same in a no-gradient pass and in a
gradient pass (eval-mode scoring: no dropout), so a gradient pass can start there: ``capture`` records those states
during a forward, ``start_from`` runs a forward in which the lower layers pass their input through untouched and the
first trained layer receives the recorded states instead. Everything else of the model's forward (embeddings,
attention mask, position embeddings, final norm, head) runs as usual, so any Hugging Face decoder whose layers
take the hidden states as their first argument and return them works the same way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class FrozenStack:
    """The layers below ``layers[first]``, none of whose parameters (nor any other below them) trains."""

    layers: torch.nn.ModuleList  # the model's decoder layers
    first: int  # index of the first layer with a trained parameter (> 0)
    frozen: list[torch.nn.Parameter]  # every parameter of the model outside layers[first:]

    @classmethod
    def find(cls, model: torch.nn.Module) -> FrozenStack | None:
        """The model's frozen lower stack, or None: no decoder layer list found, a parameter outside the trained top
        layers trains (full fine-tuning, trained embeddings or head), or the lowest layer trains."""
        layers = _decoder_layers(model)
        if layers is None:
            return None
        trained = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
        if not trained or trained[0] == 0:
            return None
        top = {id(p) for layer in layers[trained[0]:] for p in layer.parameters()}
        outside = [p for p in model.parameters() if id(p) not in top]
        if any(p.requires_grad for p in outside):
            return None
        return cls(layers=layers, first=trained[0], frozen=outside)

    def version(self) -> int:
        """A number that changes whenever a frozen parameter is written in place (``load_state_dict``, ``copy_``)."""
        return sum(p._version for p in self.frozen)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """Yield a list that receives, per forward in the block, the (n, L, d) hidden states entering the first
        trained layer (detached)."""
        seen: list[torch.Tensor] = []

        def record(module, args, kwargs):
            seen.append((args[0] if args else kwargs["hidden_states"]).detach())

        handle = self.layers[self.first].register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield seen
        finally:
            handle.remove()

    @contextlib.contextmanager
    def start_from(self, states: torch.Tensor) -> Iterator[None]:
        """Run the forwards in the block from ``states`` (n, L, d), the input of the first trained layer: the lower
        layers pass their input through (no compute), the first trained layer gets ``states``."""

        def substitute(module, args, kwargs):
            if args:
                return (states, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": states}

        def passthrough(hidden_states, *args, **kwargs):
            return hidden_states

        lower = list(self.layers[: self.first])
        for layer in lower:
            layer.forward = passthrough  # an instance attribute: nn.Module.__call__ calls it instead of the class's
        handle = self.layers[self.first].register_forward_pre_hook(substitute, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for layer in lower:
                del layer.forward


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's list of decoder layers: the one ModuleList of Hugging Face ``GradientCheckpointingLayer``s as long
    as the config's ``num_hidden_layers`` (None when there is not exactly one)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    config = getattr(model, "config", None)  # a Hugging Face model (peft forwards the attribute)
    count = getattr(config, "num_hidden_layers", None)
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count and count
             and all(isinstance(layer, GradientCheckpointingLayer) for layer in m)]
    return found[0] if len(found) == 1 else None


def left_padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """(n, width, d) the (L_i, d) rows left-padded with zeros (finite: padded keys are masked, never NaN)."""
    return torch.stack([torch.nn.functional.pad(r, (0, 0, width - r.shape[0], 0)) for r in rows])
