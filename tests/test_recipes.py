"""Every shipped recipe validates; bad recipes fail naming the key, the file (and line) and a close match."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jsarag.errors import RecipeError
from jsarag.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_recipes_exist():
    assert RECIPES, "no recipes found"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.estimator.name and recipe.generator.options.model and recipe.retriever.options.model


def test_public_override_keys(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(), [
        f"output_dir={tmp_path / 'elsewhere'}", f"data.dir={tmp_path}", "estimator.name=rag",
        "retriever.model=some/encoder", "generator.model=some/lm", "train.max_steps=7", "train.seed=3",
        "eval.max_examples=5", "eval.at_start=true",
    ])
    assert recipe.output_dir == tmp_path / "elsewhere" and recipe.data.dir == tmp_path
    assert recipe.retriever.options.model == "some/encoder" and recipe.generator.options.model == "some/lm"
    assert (recipe.train.max_steps, recipe.train.seed, recipe.eval.max_examples, recipe.eval.at_start) == (7, 3, 5, True)


def _write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_names_key_file_line_and_close_match(tiny_recipe):
    path = tiny_recipe()
    text = path.read_text().replace("max_steps: 6", "max_stepz: 6")
    path.write_text(text)
    line = text.splitlines().index("  max_stepz: 6") + 1
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "train.max_stepz" in message and f"{path} line {line}" in message and "train.max_steps" in message


def test_unknown_plugin_option_names_the_plugin_schema(tiny_recipe):
    with pytest.raises(RecipeError, match=r"retriever\.top_kk: unknown key; did you mean 'retriever\.top_k'"):
        load_recipe(tiny_recipe(retriever={"top_kk": 3}))


def test_wrong_type_names_key_and_value(tiny_recipe):
    with pytest.raises(RecipeError, match=r"train\.batch_size: .*integer.*'two'.*line \d+"):
        load_recipe(tiny_recipe(train={"batch_size": "two"}))


def test_unknown_plugin_lists_registered_names(tiny_recipe):
    with pytest.raises(RecipeError, match=r"unknown estimator plugin 'raag'.*registered: .*rag.*did you mean 'rag'"):
        load_recipe(tiny_recipe(estimator={"name": "raag"}))


def test_override_errors_name_the_command_line(tiny_recipe):
    with pytest.raises(RecipeError, match=r"train\.max_steps: .*command line override 'train\.max_steps=-1'"):
        load_recipe(tiny_recipe(), ["train.max_steps=-1"])
    with pytest.raises(RecipeError, match="must look like dotted.key=value"):
        load_recipe(tiny_recipe(), ["train.max_steps"])


def test_malformed_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "train:\n  max_steps: [1, 2\n")
    with pytest.raises(RecipeError, match=rf"{path}: malformed YAML"):
        load_recipe(path)


def test_duplicate_key_is_an_error(tmp_path):
    path = _write(tmp_path, "output_dir: a\noutput_dir: b\n")
    with pytest.raises(RecipeError, match=r"line 2: duplicate key 'output_dir'"):
        load_recipe(path)


def test_yaml_tags_that_run_code_are_refused(tmp_path):
    path = _write(tmp_path, "output_dir: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_recipe(path)


def test_extends_merges_and_a_renamed_section_starts_afresh(tiny_recipe, tmp_path):
    base = tiny_recipe("base.yaml", estimator={"likelihood": "mean"})
    child = _write(tmp_path, f"extends: {base.name}\ntrain:\n  max_steps: 9\n", "child.yaml")
    recipe = load_recipe(child)
    assert recipe.train.max_steps == 9 and recipe.train.batch_size == 2 and recipe.estimator.options.likelihood == "mean"
    with pytest.raises(RecipeError, match="unknown key"):  # rag's option does not leak into another plugin
        load_recipe(child, ["estimator.name=rag", "estimator.samples=3"])


def test_extends_cycle_is_reported(tmp_path):
    _write(tmp_path, "extends: b.yaml\n", "a.yaml")
    _write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_missing_section_is_named(tmp_path, tiny_recipe):
    data = yaml.safe_load(tiny_recipe().read_text())
    del data["generator"]
    path = _write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="no 'generator' section"):
        load_recipe(path)
