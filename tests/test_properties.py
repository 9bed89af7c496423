"""Property tests (hypothesis): whatever bytes a data file or a recipe holds, and whatever overrides follow, loading
either succeeds or raises the project's own error (a JsaragError), never an unrelated exception.

Seeds are fixed (``derandomize=True``) so CI runs the same examples every time; the whole file takes about 30 s.
"""
from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_recipe_dict
from jsarag.data import load_examples
from jsarag.errors import JsaragError
from jsarag.kb import KnowledgeBase, load_kb
from jsarag.plugins import Plugins
from jsarag.recipe import load_recipe

DATA_RUNS = settings(max_examples=250, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
RECIPE_RUNS = settings(max_examples=200, deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FORMS = st.sampled_from(["plain", "gzip", "not gzip"])
KB_LINES = [{"id": "p0", "title": "", "text": "Knead ten minutes."}, {"id": "p1", "title": "Salt", "text": "Salt it."}]


def returns_or_refuses(load: Callable[[], Any]) -> Any:
    """Call ``load``; a JsaragError is an accepted outcome (returns None), any other exception fails the test."""
    try:
        return load()
    except JsaragError:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Strategies: JSON lines, right and wrong

any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates included
# no subnormal floats: a jsarag run in this process flushes them to zero (as every run does), and hypothesis then
# refuses to draw them
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_subnormal=False) | any_text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner,
                                                                                                 max_size=3),
                           max_leaves=8)
string_lists = st.lists(st.sampled_from(["", "p0", "p1", "p9", "ten minutes", "CANNOTANSWER"]), max_size=3)
example_fields = {  # plausible values, some of them wrong ("", an id not in the KB, a lone surrogate)
    "id": st.sampled_from(["e0", "e1", "e2", "", " "]),
    "context": string_lists,
    "question": st.sampled_from(["How long?", "Why?", "", "q\ud800"]),
    "answer": st.sampled_from(["ten minutes", "salt", "", "CANNOTANSWER"]),
    "answers": string_lists,
    "gold_passage_ids": string_lists,
}
passage_fields = {
    "id": st.sampled_from(["p0", "p1", "p2", "p3", ""]),
    "title": st.sampled_from(["", "Bread"]),
    "text": st.sampled_from(["Knead it.", "Salt it.", "\udfff"]),
}


def json_objects(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict]:
    """Objects of ``fields``, each with at most one field left out or replaced by any JSON value."""

    def break_one(obj: dict) -> st.SearchStrategy[dict]:
        left_out = st.sampled_from(list(obj)).map(lambda key: {k: v for k, v in obj.items() if k != key})
        replaced = st.tuples(st.sampled_from(list(obj)), json_values).map(lambda kv: {**obj, kv[0]: kv[1]})
        return st.just(obj) | left_out | replaced

    return st.fixed_dictionaries(fields).flatmap(break_one)


def json_line(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[bytes]:
    """A line holding an object of ``fields`` (perhaps broken), any JSON value, JSON nested deep, or any bytes."""
    objects = json_objects(fields).map(lambda o: json.dumps(o).encode())
    others = json_values.map(lambda v: json.dumps(v).encode())
    deep = st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n)
    return st.one_of(objects, objects, objects, others, deep, st.binary(max_size=40))


def file_content(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[bytes]:
    """A whole file: lines of ``json_line`` and blank lines, or arbitrary bytes."""
    lines = st.lists(json_line(fields) | st.just(b""), max_size=6).map(b"\n".join)
    return st.one_of(lines, lines, lines, st.binary(max_size=200))


def write(folder: Path, name: str, content: bytes, form: str) -> Path:
    """Write ``content`` to <folder>/<name>.jsonl (form "plain"), gzip-compressed to .jsonl.gz ("gzip"), or as it is
    to .jsonl.gz ("not gzip")."""
    path = folder / (f"{name}.jsonl" if form == "plain" else f"{name}.jsonl.gz")
    path.write_bytes(gzip.compress(content) if form == "gzip" else content)
    return path


def lines_in(content: bytes) -> int:
    """Non-blank lines of a file, as the loaders count them."""
    return sum(1 for line in content.split(b"\n") if line.strip())


@pytest.fixture(scope="module")
def kb(tmp_path_factory) -> KnowledgeBase:
    path = tmp_path_factory.mktemp("kb") / "passages.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in KB_LINES))
    return load_kb(path)


# ---------------------------------------------------------------------------------------------------------------------
# Data loaders


@DATA_RUNS
@given(content=file_content(passage_fields), form=FORMS)
def test_any_passages_file_loads_or_is_a_data_error(content: bytes, form: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        loaded = returns_or_refuses(lambda: load_kb(write(Path(folder), "passages", content, form)))
    if loaded is not None:
        assert len(loaded) == lines_in(content) and len(set(loaded.ids)) == len(loaded)
        assert len(loaded.fingerprint) == 64 and all(loaded.row(pid) == row for row, pid in enumerate(loaded.ids))


@DATA_RUNS
@given(content=file_content(example_fields), form=FORMS, on_error=st.sampled_from(["raise", "skip"]),
       with_kb=st.booleans(), drop_unanswerable=st.booleans())
def test_any_examples_file_loads_or_is_a_data_error(kb, content: bytes, form: str, on_error: str,
                                                    with_kb: bool, drop_unanswerable: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), "train", content, form)
        loaded = returns_or_refuses(lambda: load_examples(path, kb if with_kb else None, on_error=on_error,
                                                          drop_unanswerable=drop_unanswerable))
    if loaded is not None:
        assert len(loaded) + loaded.skipped + loaded.dropped_unanswerable == lines_in(content)
        assert on_error == "skip" or loaded.skipped == 0
        for example in loaded:
            assert example.question.strip() and example.answer.strip()
            example.question.encode("utf-8")  # no lone surrogate reaches a tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Recipes

RECIPE_KEYS = ["output_dir", "resume", "data", "data.dir", "data.on_error", "data.eval_splits", "data.train_split",
               "data.passages", "data.passages.fields", "data.passages.fields.text", "data.examples", "data.splits",
               "data.splits.dev", "data.splits.dev.path", "data.fields", "data.fields.answer",
               "retriever", "retriever.name", "candidates.prior_top_k", "retriever.temperature", "retriever.dir",
               "posterior", "posterior.lr", "candidates.mode",
               "index", "index.name", "index.dir", "index.type", "generator", "generator.lora", "generator.lr",
               "generator.max_prompt_tokens", "estimator", "estimator.name", "observers", "train", "train.max_steps",
               "train.betas", "train.grad_clip", "eval.top_k", "deepspeed", "deepspeed.overrides", "extends", "source"]
yaml_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_subnormal=False) | any_text
                | st.sampled_from(["dense", "faiss", "bm25", "rag", "jsa", "kb", "../x", "/tmp", "1e-5", "base.yaml"]))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["name", "dir", "top_k", "lr", "r", "x"]) | st.text(max_size=6), inner, max_size=3), max_leaves=10)
printable = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=20)
value_texts = st.one_of(st.sampled_from(["true", "null", ".inf", ".nan", "[1, 2", "{a: 1}", "1e-5", "'x'", "3", "0.5",
                                         "!!python/none", "*a", "&a [1]", "1" * 4400, "[" * 3000, "- a\n- b", "0x1F",
                                         "2024-01-01", "[.nan, 1]", "'100'", "../x", "a/b", "kb", "bm25", "vrag"]),
                        yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()), printable)
override_items = st.one_of(st.tuples(st.sampled_from(RECIPE_KEYS), value_texts).map("=".join),
                           st.tuples(st.sampled_from(RECIPE_KEYS), value_texts).map("=".join),
                           st.tuples(st.text(max_size=8), value_texts).map("=".join), st.text(max_size=12))
overrides = st.lists(override_items, max_size=3)


def edited(base: dict, edits: list[tuple[str, Any]]) -> dict:
    """``base`` with each dotted key set to a value (parents made, or replaced when not mappings)."""
    recipe = json.loads(json.dumps(base))
    for key, value in edits:
        *parents, last = key.split(".")
        node = recipe
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return recipe


def recipe_texts(base: dict) -> st.SearchStrategy[str]:
    """A valid recipe with some keys set to anything, cut short or with text spliced in; or any text at all."""
    edits = st.lists(st.tuples(st.sampled_from(RECIPE_KEYS) | st.text(max_size=6), yaml_values), max_size=3)
    dumped = edits.map(lambda e: yaml.safe_dump(edited(base, e), allow_unicode=True))
    spliced = st.tuples(dumped, st.integers(0, 2000), printable).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1]:])
    return st.one_of(dumped, dumped, dumped, spliced, st.text(max_size=200))


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return Plugins()


@pytest.fixture(scope="module")
def base_recipe(tiny_data, tmp_path_factory) -> dict:
    return tiny_recipe_dict(tiny_data, tmp_path_factory.mktemp("runs") / "run")


@RECIPE_RUNS
@given(data=st.data())
def test_any_recipe_and_overrides_load_or_are_a_recipe_error(plugins, base_recipe, data) -> None:
    text = data.draw(recipe_texts(base_recipe), label="recipe")
    items = data.draw(overrides, label="overrides")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        (Path(folder) / "base.yaml").write_text(yaml.safe_dump(base_recipe))
        returns_or_refuses(lambda: load_recipe(path, items, plugins))


@RECIPE_RUNS
@given(content=st.binary(max_size=300), items=overrides)
def test_any_recipe_bytes_load_or_are_a_recipe_error(plugins, content: bytes, items: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_bytes(content)
        returns_or_refuses(lambda: load_recipe(path, items, plugins))
