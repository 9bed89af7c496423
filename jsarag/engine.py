"""DeepSpeed: the process group, the config from ds_configs/, one engine over every trainable module, shutdown.

Works under ``deepspeed --num_gpus N script.py`` and as plain ``python script.py`` (one process, env defaults).
Without a GPU it uses DeepSpeed's CPU accelerator with gloo.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
import socket
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

if not torch.cuda.is_available():  # must precede the first deepspeed import
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.runtime.zero.utils import ZeRORuntimeException  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

from jsarag.api import StepResult, Trainable  # noqa: E402
from jsarag.checkpoint import describe_write_error, load_file  # noqa: E402
from jsarag.errors import RecipeError, TrainingError  # noqa: E402
from jsarag.files import fsync  # noqa: E402
from jsarag.paths import confined  # noqa: E402

DS_CONFIG_DIR = Path(str(resources.files("jsarag.ds_configs")))  # the repository's ds_configs/, installed as data
SHARED_MEMORY = Path("/dev/shm")  # where POSIX shm_open names live on Linux
# The classes DeepSpeed pickles into its checkpoint files besides tensors and plain values, found with
# torch.serialization.get_unsafe_globals_in_checkpoint on real checkpoints of the tiny recipe: ZeRO 1-3 optimizer
# states hold the loss scaler, the ZeRO stage and (ZeRO 1-2) fragment addresses; fp16 runs hold DynamicLossScaler in
# place of LossScaler; ZeRO 0 and model-state files hold none. Nothing else may be unpickled.
CHECKPOINT_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
# what engine.load_checkpoint raises on a checkpoint it cannot load: missing files (an assertion in its loader),
# tensors of other shapes (load_state_dict), another number of ranks under ZeRO
CHECKPOINT_LOAD_ERRORS = (AssertionError, OSError, RuntimeError, ZeRORuntimeException)
# ds-config settings that would read or write checkpoints past GuardedCheckpointEngine (key path, what it does)
UNGUARDED_CHECKPOINTING = {
    ("checkpoint", "load_universal"): "loads universal checkpoints with torch.load(weights_only=False)",
    ("checkpoint", "writer"): "swaps in DeepSpeed's fast/decoupled writer, which finishes files after the save returns",
    ("datastates_ckpt",): "swaps in the DataStates engine, which writes in the background",
}
# ds-config keys naming a file or folder DeepSpeed writes to (kept inside output_dir unless absolute)
WRITER_PATHS = {
    ("tensorboard", "output_path"): "tensorboard",
    ("csv_monitor", "output_path"): "csv_monitor",
    ("flops_profiler", "output_file"): None,
    ("zero_optimization", "offload_param", "nvme_path"): None,
    ("zero_optimization", "offload_optimizer", "nvme_path"): None,
}


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, in a plain process, create) the process group; return rank, world size and device."""
    if "RANK" not in os.environ:  # plain `python script.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        check_build_lock()
        try:
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
        except torch.distributed.DistNetworkError as exc:
            raise _port_error(exc) from None
        _unlink_shared_memory_name()
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


STALE_BUILD_LOCK_SECONDS = 600  # DeepSpeed's CPU comm op builds in ~30 s; a lock this old was left by a killed build


def build_lock() -> Path:
    """The lock torch's JIT build of DeepSpeed's CPU comm op holds while it builds (torch's own folder rule)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                       f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{python}_{accelerator}")
    return Path(root) / "deepspeed_shm_comm" / "lock"


def check_build_lock(max_age: float = STALE_BUILD_LOCK_SECONDS) -> None:
    """Refuse a stale build lock (a RecipeError naming it and the fix): torch would wait on it forever, silently."""
    lock = build_lock()
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > max_age:
        raise RecipeError(f"{lock} is {age / 60:.0f} minutes old: a DeepSpeed op build that was killed left it, and "
                          f"every DeepSpeed start would wait on it forever; remove it (rm {lock}) and run again")


def _port_error(exc: Exception) -> Exception:
    """Say which port is taken and how to pick another, for the rendezvous failure that means it (else ``exc``)."""
    if "EADDRINUSE" not in str(exc) and "address already in use" not in str(exc):
        return exc
    address, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "?")
    return RecipeError(f"MASTER_PORT {port} on {address} is already in use (another job's rendezvous?): pass a free "
                       f"port to the launcher, e.g. deepspeed --master_port {_free_port()} ..., or set MASTER_PORT")


def _unlink_shared_memory_name() -> None:
    """Remove the name of this rank's CPU all-reduce buffer, once every rank has mapped every buffer.

    DeepSpeed's CPU accelerator creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (66 MiB of
    RAM-backed memory per rank, for its inference all-reduce) and never removes it, so every CPU run, killed or not,
    would leave it behind until the machine's memory is gone. Unlinked, the mappings stay valid and the memory is
    freed when the process ends, however it ends.
    """
    if get_accelerator().device_name() != "cpu":
        return
    dist.barrier()  # every rank's init has opened every rank's buffer
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    (SHARED_MEMORY / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}").unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_ds_config(name: str, overrides: dict[str, Any], train: Any, output_dir: Path) -> dict[str, Any]:
    """Read a DeepSpeed config (a ds_configs/ name or a path), merge overrides, fill every "auto" from the recipe,
    keep DeepSpeed's output files inside ``output_dir`` and refuse settings that bypass jsarag's checkpointing."""
    config = _deep_merge(_read_ds_config(name), overrides, "deepspeed.overrides")
    autos = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
    }
    for key, value in autos.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    bf16 = _section(config, ("bf16",), create=True)
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    params = _section(config, ("optimizer", "params")) or {}
    for key, value in {"lr": 1e-5, "betas": list(train.betas), "weight_decay": train.weight_decay}.items():
        if params.get(key) == "auto":
            params[key] = value
    _refuse_unguarded_checkpointing(config)
    _confine_writer_paths(config, output_dir)
    return config


def _read_ds_config(name: str) -> dict[str, Any]:
    """Read the JSON object of a DeepSpeed config file; every way it can be wrong is a RecipeError."""
    path = Path(name) if Path(name).exists() else DS_CONFIG_DIR / name
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(sorted(p.name for p in DS_CONFIG_DIR.glob("*.json")))
        raise RecipeError(f"deepspeed.config: no file '{name}' (here or in {DS_CONFIG_DIR}: {known})") from None
    except IsADirectoryError:
        raise RecipeError(f"deepspeed.config: {path} is a folder; name a DeepSpeed JSON file (e.g. zero2.json)") from None
    except UnicodeDecodeError:
        raise RecipeError(f"deepspeed.config: {path} is not UTF-8 text; name a DeepSpeed JSON file") from None
    except json.JSONDecodeError as exc:
        raise RecipeError(f"deepspeed.config: {path}: malformed JSON: {exc}") from None
    except OSError as exc:
        raise RecipeError(f"deepspeed.config: cannot read {path}: {exc.strerror}") from None
    if not isinstance(config, dict):
        raise RecipeError(f"deepspeed.config: {path} holds a JSON {type(config).__name__}; a DeepSpeed config is a "
                          "JSON object ({\"zero_optimization\": {...}, ...})")
    return config


def _deep_merge(base: dict, extra: dict, key: str) -> dict:
    """Merge ``extra`` into ``base``; a section of settings may only be replaced by a mapping."""
    out = dict(base)
    for name, value in extra.items():
        here, current = f"{key}.{name}", out.get(name)
        if isinstance(current, dict) and not isinstance(value, dict):
            raise RecipeError(f"{here}: {value!r} would replace the section '{name}' of the DeepSpeed config; write a "
                              f"mapping of its settings, e.g. {name}: {{enabled: true}}")
        out[name] = _deep_merge(current, value, here) if isinstance(current, dict) else value
    return out


def _section(config: dict, keys: tuple[str, ...], create: bool = False) -> dict | None:
    """Return the nested mapping at ``keys`` (None when absent, unless ``create``); one that is not a mapping is a
    RecipeError."""
    here: Any = config
    for depth, key in enumerate(keys):
        if key not in here and create:
            here[key] = {}
        here = here.get(key)
        if here is None:
            return None
        if not isinstance(here, dict):
            dotted = ".".join(keys[: depth + 1])
            raise RecipeError(f"deepspeed.config/deepspeed.overrides: '{dotted}' must be a mapping of settings, got "
                              f"{here!r}")
    return here


def _refuse_unguarded_checkpointing(config: dict) -> None:
    """Refuse settings under which DeepSpeed would load or write checkpoints past GuardedCheckpointEngine."""
    for keys, effect in UNGUARDED_CHECKPOINTING.items():
        parent = _section(config, keys[:-1]) if len(keys) > 1 else config
        value = parent.get(keys[-1]) if parent is not None else None
        if value not in (None, False):
            raise RecipeError(f"deepspeed.config/deepspeed.overrides: '{'.'.join(keys)}' is not supported: it {effect}, "
                              "bypassing jsarag's safe checkpoint loading (weights_only) and complete-or-absent "
                              "checkpoints; remove it")


def _confine_writer_paths(config: dict, output_dir: Path) -> None:
    """Resolve the paths DeepSpeed writes to under ``output_dir`` (absolute ones stay); fill empty monitor paths."""
    for keys, default in WRITER_PATHS.items():
        parent, dotted = _section(config, keys[:-1]), f"deepspeed.config {'.'.join(keys)}"
        value = parent.get(keys[-1]) if parent is not None else None
        if value in (None, ""):
            if default is None or parent is None or not parent.get("enabled"):
                continue
            value = str(output_dir / default)  # DeepSpeed would write under the current folder
        if not isinstance(value, str):
            raise RecipeError(f"{dotted}: {value!r} is not a path")
        parent[keys[-1]] = str(confined(value, output_dir, dotted))
        if "job_name" in parent:  # monitors write into output_path/job_name
            confined(str(parent["job_name"]), output_dir, f"deepspeed.config {keys[0]}.job_name")


class Trainables(torch.nn.ModuleDict):
    """Every trainable module of the run under one engine, by role then name (``prior.query_encoder``, ...); its
    forward runs one micro-step's hooks.

    Its state dict holds what trains: frozen parameters (a LoRA generator's base model, with every alias of a tied
    weight such as ``lm_head.weight``) are left out, so checkpoints do not rewrite them, and loading accepts their
    absence: they keep the values the run built them with (the same base model again)."""

    def forward(self, step: Callable[[], StepResult]) -> tuple[torch.Tensor, StepResult]:  # type: ignore[override]
        """Return ``(loss, result)``: DeepSpeed finds the loss in a tuple and hooks its pre-backward step onto it."""
        result = step()
        return result.loss, result

    def frozen_names(self) -> set[str]:
        """Names of the parameters that do not train, every alias of a tied one included."""
        return {name for name, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def state_dict(self, *, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The modules' state without their frozen parameters."""
        state = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for name in self.frozen_names():
            state.pop(prefix + name, None)
        return state

    def mismatch(self, state: dict[str, Any]) -> str | None:
        """Say which keys of ``state`` the modules lack, and which of theirs (frozen ones aside) it lacks; None
        when it fits."""
        mine = set(super().state_dict(keep_vars=True))
        missing = sorted(mine - set(state) - self.frozen_names())
        unexpected = sorted(set(state) - mine)
        if not missing and not unexpected:
            return None
        return f"missing {_few(missing)}; unexpected {_few(unexpected)}"

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a state; with ``strict`` every key must match but the frozen parameters' (they may be absent)."""
        problem = self.mismatch(state_dict) if strict else None
        if problem:
            raise RuntimeError(f"the checkpoint's weights do not fit the run's modules: {problem}")
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        frozen = self.frozen_names()
        result.missing_keys[:] = [key for key in result.missing_keys if key not in frozen]
        return result


def _few(keys: list[str], shown: int = 5) -> str:
    """Up to ``shown`` keys and how many more, for messages."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return (", ".join(keys[:shown]) or "none") + more


def module_tree(trainables: dict[str, dict[str, Trainable]]) -> Trainables:
    """The trainable modules by role then name, as the engine holds them (so their state-dict keys are the
    checkpoint's: ``prior.query_encoder.<parameter>``)."""
    return Trainables({role: torch.nn.ModuleDict({name: t.module for name, t in modules.items()})
                       for role, modules in trainables.items()})


def lr_schedule(optimizer: torch.optim.Optimizer, train: Any) -> Any:
    """transformers' schedule ``train.schedule`` after ``train.warmup_steps`` of linear warm-up, for every schedule
    (transformers' own "constant" ignores its warm-up steps: "constant_with_warmup" is the one that has them)."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if train.schedule == "constant" and train.warmup_steps else train.schedule
    return get_scheduler(name, optimizer, num_warmup_steps=train.warmup_steps,
                         num_training_steps=max(train.max_steps, 1))


def build_engine(trainables: dict[str, dict[str, Trainable]], ds_config: dict[str, Any], train: Any) -> Any:
    """Wrap the modules in one DeepSpeed engine with a learning rate per module and a warm-up schedule."""
    module = module_tree(trainables)
    groups = [
        {"params": [p for p in t.module.parameters() if p.requires_grad], "lr": t.lr, "name": f"{role}.{name}"}
        for role, modules in trainables.items() for name, t in modules.items()
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(groups, betas=tuple(train.betas), weight_decay=train.weight_decay)

    engine, *_ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,  # a config "optimizer" is built from these groups
        lr_scheduler=functools.partial(lr_schedule, train=train),  # built on the optimizer DeepSpeed uses
        config=ds_config,
    )
    _guard_checkpointing(engine)
    return engine


def inference_engine(trainables: dict[str, dict[str, Trainable]], ds_config: dict[str, Any]) -> Any:
    """Prepare the trainable modules to evaluate as training runs them, with no optimizer: under ZeRO-3 a DeepSpeed
    engine that partitions them and holds no optimizer state (DeepSpeed's ZeRO-Offload, returned); otherwise no
    engine (None), the modules cast to the config's half precision as the training engine casts them."""
    module = module_tree(trainables)
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) >= 3:
        config = {key: value for key, value in ds_config.items() if key not in ("optimizer", "scheduler")}
        engine, *_ = deepspeed.initialize(model=module, config=config)
        return engine
    if ds_config.get("bf16", {}).get("enabled") is True:
        module.to(torch.bfloat16)
    elif ds_config.get("fp16", {}).get("enabled") is True:
        module.half()
    return None


def is_zero3_checkpoint(folder: Path) -> bool:
    """Whether a checkpoint folder holds ZeRO-3 partitions (one model states file per rank)."""
    return any(folder.glob("*zero_pp_rank_*_mp_rank_00_model_states.pt"))


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The module state of a complete checkpoint folder, whole, in this process, whatever ZeRO stage and number of
    ranks wrote it: ZeRO 0-2 from its model states file (the weights as the model held them), ZeRO-3 consolidated
    from the ranks' partitions by DeepSpeed's zero_to_fp32 (fp32 master weights). Every file is read with
    ``weights_only=True``. Frozen parameters are absent (checkpoints leave them out): they are the base model's."""
    if is_zero3_checkpoint(folder):
        return _zero3_weights(folder)
    states = folder / "mp_rank_00_model_states.pt"
    if not states.exists():
        raise TrainingError(f"{folder}: no DeepSpeed model states (mp_rank_00_model_states.pt); not a complete "
                            "checkpoint of a jsarag run")
    return load_file(states, "cpu", CHECKPOINT_GLOBALS)["module"]


class _WeightsOnlyTorch:
    """The torch module as zero_to_fp32 sees it while consolidating: ``torch.load`` always with weights_only=True."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(*args: Any, **kwargs: Any) -> Any:
        return torch.load(*args, **{**kwargs, "weights_only": True})


def _zero3_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Consolidate a ZeRO-3 checkpoint with DeepSpeed's zero_to_fp32 (quietly; its torch.load made safe)."""
    from deepspeed.utils import zero_to_fp32

    quiet = io.StringIO()
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS), contextlib.redirect_stdout(quiet), \
                contextlib.redirect_stderr(quiet), _patched(zero_to_fp32, "torch", _WeightsOnlyTorch()):
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                str(folder.parent), tag=folder.name, exclude_frozen_parameters=True)
    except pickle.UnpicklingError as exc:
        raise TrainingError(f"{folder}: refused to load: a file pickles more than tensors and plain values "
                            f"({str(exc).splitlines()[0]}); it was not written by a jsarag run") from None
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as exc:
        raise TrainingError(f"{folder}: DeepSpeed's zero_to_fp32 cannot consolidate it ({type(exc).__name__}: "
                            f"{exc}); is the checkpoint complete?") from None


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``owner.name`` to ``value`` for the duration of a block."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


class GuardedCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save checkpoint engine, made safe to load from and to fail in.

    ``load`` unpickles with ``weights_only=True``, allowing only CHECKPOINT_GLOBALS. ``save`` and ``makedirs`` record
    the first failed write in ``failure`` (and skip the writes after it) instead of raising, so that every rank runs
    DeepSpeed's save, collectives included, to the end; jsarag.checkpoint.save then stops every rank alike.
    """

    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self.failure: str | None = None

    def save(self, state_dict: Any, path: str) -> None:
        """Write one file and flush it to disk, or record why not."""
        def write() -> None:
            TorchCheckpointEngine.save(self, state_dict, path)
            fsync(Path(path))

        self.attempt(path, write)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Create a folder, or record why not."""
        self.attempt(path, lambda: os.makedirs(path, exist_ok=exist_ok))

    def attempt(self, path: str, write: Callable[[], Any]) -> None:
        """Run a write unless an earlier one failed; record its failure."""
        if self.failure is not None:
            return
        try:
            write()
        except (OSError, RuntimeError) as exc:  # torch.save's writer raises RuntimeError on a short write
            self.failure = f"{path}: {describe_write_error(exc, Path(path).parent)}"

    def load(self, path: str, map_location: Any = None) -> Any:
        """Read a checkpoint file with weights_only=True: a file that pickles anything else is a TrainingError."""
        return load_file(Path(path), map_location, CHECKPOINT_GLOBALS)


def _guard_checkpointing(engine: Any) -> None:
    """Swap the engine's checkpoint engine for a GuardedCheckpointEngine (DeepSpeed looks it up on every load and
    save) and record a failed copy of DeepSpeed's recovery scripts (written beside the checkpoints) the same way."""
    guard = GuardedCheckpointEngine(engine._config)
    engine.checkpoint_engine = guard
    copy_scripts = engine._copy_recovery_script
    engine._copy_recovery_script = lambda save_path: guard.attempt(save_path, lambda: copy_scripts(save_path))


def all_ranks_finite(value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every rank (all ranks must agree to skip a step)."""
    flag = torch.tensor([float(torch.isfinite(value.detach()).all())], device=get_accelerator().current_device_name())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def all_ranks_max(value: float) -> float:
    """The largest of every rank's ``value`` (a collective)."""
    flag = torch.tensor([float(value)], device=get_accelerator().current_device_name())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag.item())


def barrier_quietly() -> None:
    """Wait for every rank, if there is a process group and every peer is still there."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except Exception:  # a peer already gone
            pass


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
