"""DeepSpeed: the process group, the config from ds_configs/, one engine over every trainable module, shutdown.

Works under ``deepspeed --num_gpus N script.py`` and as plain ``python script.py`` (one process, env defaults).
Without a GPU it uses DeepSpeed's CPU accelerator with gloo.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import torch

if not torch.cuda.is_available():  # must precede the first deepspeed import
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402

from jsarag.components import Trainable  # noqa: E402
from jsarag.errors import RecipeError  # noqa: E402
from jsarag.types import StepResult  # noqa: E402

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, in a plain process, create) the process group; return rank, world size and device."""
    if "RANK" not in os.environ:  # plain `python script.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_ds_config(name: str, overrides: dict[str, Any], train: Any) -> dict[str, Any]:
    """Read a DeepSpeed config (a ds_configs/ name or a path), merge overrides, fill every "auto" from the recipe."""
    path = Path(name) if Path(name).exists() else DS_CONFIG_DIR / name
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        known = ", ".join(sorted(p.name for p in DS_CONFIG_DIR.glob("*.json")))
        raise RecipeError(f"deepspeed.config: no file '{name}' (here or in {DS_CONFIG_DIR}: {known})") from None
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path}: malformed JSON: {exc}") from None
    config = _deep_merge(config, overrides)
    autos = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
    }
    for key, value in autos.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    bf16 = config.setdefault("bf16", {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    params = config.get("optimizer", {}).get("params", {})
    for key, value in {"lr": 1e-5, "betas": list(train.betas), "weight_decay": train.weight_decay}.items():
        if params.get(key) == "auto":
            params[key] = value
    return config


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Trainables(torch.nn.ModuleDict):
    """Every trainable module of the run under one engine; its forward runs one micro-step's hooks."""

    def forward(self, step: Callable[[], StepResult]) -> tuple[torch.Tensor, StepResult]:  # type: ignore[override]
        """Return ``(loss, result)``: DeepSpeed finds the loss in a tuple and hooks its pre-backward step onto it."""
        result = step()
        return result.loss, result


def build_engine(trainables: dict[str, Trainable], ds_config: dict[str, Any], train: Any) -> Any:
    """Wrap the modules in one DeepSpeed engine with a learning rate per module and a warm-up schedule."""
    from transformers import get_scheduler

    module = Trainables({name: t.module for name, t in trainables.items()})
    groups = [
        {"params": [p for p in t.module.parameters() if p.requires_grad], "lr": t.lr, "name": name}
        for name, t in trainables.items()
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(groups, betas=tuple(train.betas), weight_decay=train.weight_decay)

    def schedule(opt: torch.optim.Optimizer) -> Any:
        steps = max(train.max_steps, 1)
        return get_scheduler(train.schedule, opt, num_warmup_steps=train.warmup_steps, num_training_steps=steps)

    engine, *_ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,  # a config "optimizer" is built from these groups
        lr_scheduler=schedule,
        config=ds_config,
    )
    return engine


def all_ranks_finite(value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every rank (all ranks must agree to skip a step)."""
    flag = torch.tensor([float(torch.isfinite(value.detach()).all())])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def shutdown(code: int = 0) -> None:
    """End the process: flush, barrier (on success), destroy the group, ``os._exit`` (avoids gloo aborts at exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        try:
            if code == 0:  # after a failure a peer may be stuck in a collective: do not wait for it
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already gone: exit anyway with our own code
            pass
    os._exit(code)
