"""Causal LMs of real shapes built from a config with random weights: no weights need to travel to a machine.

``build(shape, tokenizer_dir, out)`` writes a Hugging Face folder (config, random weights, the tokenizer files of
``tokenizer_dir``) that ``generator.model=<out>`` loads like any model. Shapes (Llama architecture, the SmolLM2
vocabulary of 49,152 tokens):

- ``smollm2-135m``: SmolLM2-135M-Instruct's own config (30 layers, 576 wide, 9 heads / 3 KV heads, tied embeddings);
- ``1b``: a Llama-3.2-1B-like stack (16 layers, 2048 wide, 32 heads / 8 KV heads, 8192 MLP, tied embeddings);
- ``tiny``: 4 layers, 64 wide (CPU dry runs).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

SHAPES = {
    "smollm2-135m": {},  # the tokenizer folder's config.json as it is
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def build(shape: str, tokenizer_dir: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """Write a random-initialised model of ``shape`` with the tokenizer of ``tokenizer_dir`` into ``out`` (once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    config = AutoConfig.from_pretrained(tokenizer_dir)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, staging / name)
    staging.rename(out)
    return out


if __name__ == "__main__":  # python benchmarks/shaped_models.py SHAPE TOKENIZER_DIR OUT
    print(build(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
