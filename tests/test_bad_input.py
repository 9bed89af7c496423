"""Bad input and hostile files, with real components: what is cut is counted and reported, what would write outside
output_dir or run a model folder's code is refused, and every refusal is a JsaragError naming the key or file.

Kinds tested elsewhere: malformed YAML, unknown keys, wrong types and unknown plugins (test_recipes.py); bad JSONL
lines, duplicate passage ids, gold ids missing from the KB, empty questions and answers (test_data.py); an index
built for another KB or encoder (test_retrieval.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import read_log, recipe_context, run_cli, tiny_recipe_dict
from jsarag.api import Batch, Context, Example
from jsarag.errors import IndexMismatchError, ModelError, RecipeError
from jsarag.models import resolve_model
from jsarag.passages import index_dir, read_meta
from jsarag.recipe import load_recipe
from jsarag_plugins.generators.causal_lm import CausalLM
from jsarag_plugins.retrievers.bm25 import BM25Retriever
from jsarag_plugins.retrievers.dense import DenseRetriever

LONG_QUESTION = "how long should i knead a dough made of rye flour before the first rise " * 6


def _ctx(recipe, tmp_path: Path, role: str = "prior") -> Context:
    return recipe_context(recipe, tmp_path / "cache", role)


def _generator(tiny_recipe, tmp_path: Path, **options) -> CausalLM:
    recipe = load_recipe(tiny_recipe(generator=options))
    return CausalLM(recipe.generator.options, _ctx(recipe, tmp_path, "generator"))


def _tokenizer_without(tmp_path: Path, *tokens: str) -> Path:
    """A copy of jsarag/tiny-gpt2 whose tokenizer was saved without the given special tokens (pad, eos)."""
    from transformers import AutoTokenizer

    folder = tmp_path / f"tiny-gpt2-without-{'-'.join(tokens)}"
    shutil.copytree(resolve_model("jsarag/tiny-gpt2"), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for token in tokens:
        setattr(tokenizer, f"{token}_token", None)
    tokenizer.save_pretrained(folder)
    assert all(getattr(AutoTokenizer.from_pretrained(folder), f"{t}_token_id") is None for t in tokens)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# A real tiny run fed long passages and queries, a broken data line and a tokenizer without a pad token


@pytest.fixture(scope="module")
def hostile_run(tiny_data, tmp_path_factory) -> Path:
    """Train a tiny run whose budgets cut passages, queries and answers, whose train split has a broken line
    (``data.on_error: skip``) and whose generator's tokenizer has no pad token; return its output_dir."""
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data"
    shutil.copytree(tiny_data, data)
    with (data / "train.jsonl").open("a") as lines:
        lines.write('{"id": "broken", "question": \n')
    recipe = tiny_recipe_dict(data, root / "run")
    recipe["data"]["on_error"] = "skip"
    recipe["retriever"]["max_length"] = 16
    recipe["generator"].update(model=str(_tokenizer_without(root, "pad")), max_passage_tokens=12,
                               max_answer_tokens=4)
    recipe["observers"] = ["jsonl_log", "report"]
    recipe["train"]["max_steps"] = 2
    recipe["eval"]["max_examples"] = 4
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_cli("train", "--config", str(path))
    return root / "run"


def test_truncated_passages_queries_and_answers_are_counted_in_metrics_and_report(hostile_run):
    counters = json.loads((hostile_run / "metrics.json").read_text())["counters"]
    assert counters["generator"]["passages_truncated"] > 0
    assert counters["generator"]["answers_truncated"] > 0
    assert counters["prior"]["queries_truncated"] > 0
    report = (hostile_run / "report.md").read_text()
    setup = report[report.index("## Setup"):]
    assert f"passages truncated {counters['generator']['passages_truncated']}" in setup
    assert f"queries truncated {counters['prior']['queries_truncated']}" in setup


def test_skipped_lines_are_counted_in_metrics(hostile_run):
    counters = json.loads((hostile_run / "metrics.json").read_text())["counters"]
    assert counters["data"]["train_skipped"] == 1 and counters["data"]["dev_skipped"] == 0


def test_a_tokenizer_without_pad_token_trains_with_eos_padding(hostile_run):
    losses = [record["loss"] for record in read_log(hostile_run)]
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert json.loads((hostile_run / "metrics.json").read_text())["final"]["dev"]


def test_a_tokenizer_without_pad_or_eos_token_is_refused(tiny_recipe, tmp_path):
    folder = _tokenizer_without(tmp_path, "pad", "eos")
    with pytest.raises(ModelError, match="no EOS token"):
        _generator(tiny_recipe, tmp_path, model=str(folder))


# ---------------------------------------------------------------------------------------------------------------------
# Prompts longer than the budget, budgets longer than the context


def test_the_question_is_kept_when_the_passage_fills_the_prompt(tiny_recipe, tmp_path):
    generator = _generator(tiny_recipe, tmp_path, max_passage_tokens=200, max_prompt_tokens=64)
    kb = generator.ctx.kb
    row = max(range(len(kb)), key=lambda r: len(kb.render(r)))  # the longest passage: longer than the prompt
    example = Example("e", ("earlier question", "earlier answer"), "how long to knead?", "ten minutes", (), ())
    prompt = generator.prompt_ids(Batch([example], [0]), 0, row)
    text = generator.tokenizer.decode(prompt)
    assert len(prompt) <= 64
    assert text.endswith("question : how long to knead? answer :")  # the uncased BERT vocabulary of tiny-gpt2
    assert generator.counters() == {"passages_truncated": 1, "questions_truncated": 0, "answers_truncated": 0}


def test_a_question_longer_than_the_prompt_keeps_its_end_and_is_counted(tiny_recipe, tmp_path):
    generator = _generator(tiny_recipe, tmp_path, max_passage_tokens=200, max_prompt_tokens=64)
    example = Example("e", (), LONG_QUESTION + "and the last words?", "ten minutes", (), ())
    for _ in range(2):  # the same question twice: counted once
        prompt = generator.prompt_ids(Batch([example], [0]), 0, 0)
    text = generator.tokenizer.decode(prompt)
    assert len(prompt) <= 64 and text.endswith("and the last words? answer :")
    passage = generator.tokenizer.decode(generator._row_ids(0)[:5])
    assert passage in text  # half the room stays with the passage
    assert generator.counters()["questions_truncated"] == 1
    restored = _generator(tiny_recipe, tmp_path, max_passage_tokens=200, max_prompt_tokens=64)
    restored.load_state_dict(generator.state_dict())  # counts survive a checkpoint
    assert restored.counters() == generator.counters()


def test_budgets_longer_than_the_models_context_are_refused(tiny_recipe, tmp_path):
    with pytest.raises(ModelError, match=r"generator\.max_prompt_tokens \(500\) \+ generator\.max_answer_tokens "
                                         r"\(24\).* more than the context of jsarag/tiny-gpt2 \(512\)"):
        _generator(tiny_recipe, tmp_path, max_prompt_tokens=500)


def test_a_prompt_budget_smaller_than_the_template_is_refused(tiny_recipe, tmp_path):
    with pytest.raises(ModelError, match=r"generator\.max_prompt_tokens \(8\) leaves no room"):
        _generator(tiny_recipe, tmp_path, max_prompt_tokens=8)


# ---------------------------------------------------------------------------------------------------------------------
# Code in model folders runs only with trust_remote_code: true


def _model_with_code(tmp_path: Path, name: str, marker: Path) -> Path:
    """A copy of a tiny model whose config names a model type of its own, with code in the folder (auto_map) that
    creates ``marker`` when imported."""
    folder = tmp_path / f"{name.split('/')[1]}-with-code"
    shutil.copytree(resolve_model(name), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="with_code", auto_map={
        "AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel",
        "AutoModelForCausalLM": "custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    return folder


def test_a_generator_folder_with_code_is_refused_without_trust_remote_code(tiny_recipe, tmp_path):
    marker = tmp_path / "code-ran"
    folder = _model_with_code(tmp_path, "jsarag/tiny-gpt2", marker)
    with pytest.raises(ModelError, match=r"generator\.model .* ships Python code .* generator\.trust_remote_code"):
        _generator(tiny_recipe, tmp_path, model=str(folder))
    assert not marker.exists()


def test_a_retriever_folder_with_code_is_refused_without_trust_remote_code(tiny_recipe, tmp_path):
    marker = tmp_path / "code-ran"
    folder = _model_with_code(tmp_path, "jsarag/tiny-bert", marker)
    recipe = load_recipe(tiny_recipe(retriever={"model": str(folder)}))
    ctx = _ctx(recipe, tmp_path)
    with pytest.raises(ModelError, match=r"prior\.model .* ships Python code .* prior\.trust_remote_code"):
        DenseRetriever(recipe.retriever.options, ctx)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Paths in recipes write inside output_dir


@pytest.mark.parametrize("override, key", [
    ("output_dir=../x", "output_dir"),
    ("index.dir=../x", "index.dir"),
    ("index.dir=cache/../../x", "index.dir"),
    ("data.eval_splits=[../x]", "data.eval_splits"),
    ("data.train_split=sub/train", "data.train_split"),
])
def test_recipe_paths_that_climb_out_of_output_dir_are_refused(tiny_recipe, override, key):
    with pytest.raises(RecipeError, match=rf"^{key}: .*command line override"):
        load_recipe(tiny_recipe(), [override])


def test_a_bm25_dir_that_climbs_out_is_refused(tiny_recipe):
    with pytest.raises(RecipeError, match=r"^retriever\.dir: the relative path '\.\./x' climbs out"):
        load_recipe(tiny_recipe(retriever={"name": "bm25", "dir": "../x"}))


def test_relative_cache_dirs_resolve_under_output_dir_and_absolute_ones_stay(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(), ["index.dir=indexes"])
    ctx = _ctx(recipe, tmp_path)
    assert index_dir(recipe.index.options.dir, ctx) == recipe.output_dir / "indexes"
    assert index_dir(tmp_path / "elsewhere", ctx) == tmp_path / "elsewhere"
    bm25 = load_recipe(tiny_recipe(retriever={"name": "bm25", "dir": "bm25"}))
    BM25Retriever(bm25.retriever.options, _ctx(bm25, tmp_path))
    assert list((bm25.output_dir / "bm25").glob("*/params.index.json"))


# ---------------------------------------------------------------------------------------------------------------------
# Damaged index folders


def _hashed(texts: list[str]) -> np.ndarray:
    """(n, 8) deterministic unit vectors of texts: an encoder that needs no model."""
    rows = [np.random.default_rng(sum(map(ord, t))).standard_normal(8) for t in texts]
    vectors = np.asarray(rows, np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def built_index(tiny_recipe, tmp_path):
    """A flat index of the tiny KB built into <output_dir>/indexes; returns (ctx, its folder)."""
    recipe = load_recipe(tiny_recipe(), ["index.dir=indexes"])
    built = _ctx(recipe, tmp_path).passage_index("hashed", _hashed, batch_size=8)
    return recipe, built.folder


def _load_again(recipe, tmp_path: Path):
    """Load the index as another run would (a fresh context: nothing loaded yet)."""
    return _ctx(recipe, tmp_path).passage_index("hashed", _hashed, batch_size=8)


def test_a_corrupt_meta_json_is_an_index_mismatch(built_index, tmp_path):
    recipe, folder = built_index
    (folder / "meta.json").write_text('{"kb": "trunc')
    with pytest.raises(IndexMismatchError, match=rf"{folder}/meta.json is corrupt .* delete the folder"):
        _load_again(recipe, tmp_path)


def test_a_missing_vectors_file_is_an_index_mismatch(built_index, tmp_path):
    recipe, folder = built_index
    (folder / "vectors.npy").unlink()
    with pytest.raises(IndexMismatchError, match=rf"{folder}: no vectors.npy .* delete the folder"):
        _load_again(recipe, tmp_path)


def test_an_index_live_folder_of_another_passage_encoder_is_refused(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(retriever={"train_passages": True, "passage_lr": 1e-3}))
    retriever = DenseRetriever(recipe.retriever.options, _ctx(recipe, tmp_path))
    retriever.refresh(step=2)  # writes <output_dir>/index-live/prior for this encoder
    live = retriever.passages.folder
    meta = read_meta(live)
    (live / "meta.json").write_text(json.dumps({**meta, "encoder": "another:64+trained"}))
    with pytest.raises(IndexMismatchError, match="index-live/prior: index built for another encoder"):
        DenseRetriever(recipe.retriever.options, _ctx(recipe, tmp_path))
