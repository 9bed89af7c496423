"""Every shipped recipe validates; bad recipes fail naming the key, the file (and line) and a close match."""
from __future__ import annotations

import argparse
import importlib
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
    with pytest.raises(RecipeError, match=r"retriever\.max_lenght: unknown key; did you mean 'retriever\.max_length'"):
        load_recipe(tiny_recipe(retriever={"max_lenght": 3}))


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


def test_extends_names_a_packaged_recipe_when_no_file_is_beside(tmp_path):
    child = _write(tmp_path, "extends: tiny_rag\ntrain:\n  max_steps: 7\n", "mine.yaml")
    recipe = load_recipe(child)
    assert recipe.train.max_steps == 7 and recipe.estimator.name == "rag"  # the rest from the packaged tiny_rag
    _write(tmp_path, "extends: mine.yaml\ntrain:\n  max_steps: 8\n", "tiny_rag.yaml")  # a file beside wins
    assert load_recipe(_write(tmp_path, "extends: tiny_rag.yaml\n", "child.yaml")).train.max_steps == 8


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


# ---------------------------------------------------------------------------------------------------------------------
# Hostile or odd recipe files: every one is a RecipeError that says where


def _base(tmp_path: Path) -> Path:
    """A valid recipe to extend."""
    return _write(tmp_path, (Path(__file__).resolve().parent.parent / "recipes" / "tiny_rag.yaml").read_text(),
                  "base.yaml")


BAD_FILES = {  # name: (recipe text or bytes, message)
    "a folder": (None, "is a folder, not a recipe file"),
    "extends a folder": ("extends: .\n", "is a folder, not a recipe file"),
    "UTF-16": ("output_dir: x\n".encode("utf-16"), "not UTF-8 text"),
    "Latin-1": ("output_dir: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    "extends with a NUL": ('extends: "a\\0b"\n', r"extends: the string 'a\\x00b' holds a NUL character.*line 1"),
    "extends a name too long": ("extends: " + "a" * 300 + "\n", r"cannot be read \(File name too long\)"),
    "extends not a string": ("extends: [a.yaml]\n", r"line 1: 'extends' must be a path"),
    "nested 5000 deep": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "malformed YAML: nested too deeply"),
    "nested 100 deep": ("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 100)), "line 65: nested more than 64"),
    "a number key": ("extends: base.yaml\n1: 2\n", r"line 2: the key '1' is not a name"),
    "a boolean key": ("extends: base.yaml\ntrain:\n  on: 3\n", r"line 3: the key 'on' is not a name"),
    "a null key": ("extends: base.yaml\n~: 2\n", r"line 2: the key '~' is not a name"),
    "a lone surrogate": ('extends: base.yaml\noutput_dir: "a\\ud800"\n', r"output_dir: .*lone surrogate.*line 2"),
    "an alias bomb": ("extends: base.yaml\ndeepspeed:\n  overrides:\n" + "".join(
        f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9 if i else ['x'] * 9)}]\n" for i in range(10)),
        "more than 100000 values"),
    "observers as a number": ("extends: base.yaml\nobservers: 7\n", r"observers: a list of observer names or \{name: ...\} mappings, got 7"),
    "observers as a string": ("extends: base.yaml\nobservers: progress\n", r"observers: a list of observer names .* got 'progress'"),
    "a date": ("extends: base.yaml\noutput_dir: 2024-01-01\n", r"output_dir: Input is not a valid path"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_recipe_files_are_recipe_errors(tmp_path, case):
    _base(tmp_path)
    content, message = BAD_FILES[case]
    path = tmp_path if content is None else tmp_path / "bad.yaml"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


BAD_OVERRIDES = {  # override: message; values are taken strictly as YAML wrote them
    "observers=5": r"observers: a list of observer names .* got 5",
    "observers=true": r"observers: a list of observer names .* got True",
    "train.max_steps='100'": r"train\.max_steps: Input should be a valid integer, got '100'",
    "train.max_steps=true": r"train\.max_steps: Input should be a valid integer, got True",
    "train.batch_size=2.0": r"train\.batch_size: Input should be a valid integer, got 2\.0",
    "retriever.temperature=.inf": r"retriever\.temperature: Input should be a finite number",
    "train.grad_clip=.inf": r"train\.grad_clip: Input should be a finite number",
    "train.betas=[.nan,.nan]": r"train\.betas\.0: Input should be a finite number",
    "generator.lr='1e-4'": r"generator\.lr: Input should be a valid number, got '1e-4'",
    "generator.lora={r: '8'}": r"generator\.lora\.r: Input should be a valid integer",
    "train.seed=" + "1" * 4301: r"the value is not valid YAML: a value cannot be converted \(Exceeds the limit",
    "train.seed=" + "[" * 5000 + "]" * 5000: "the value is not valid YAML: nested too deeply",
    'output_dir="a\\0b"': "holds a NUL character",
}


@pytest.mark.parametrize("override", sorted(BAD_OVERRIDES), ids=lambda o: o[:40])
def test_bad_overrides_are_recipe_errors(tiny_recipe, override):
    with pytest.raises(RecipeError, match=BAD_OVERRIDES[override]):
        load_recipe(tiny_recipe(), [override])


def test_numbers_paths_and_betas_are_read_as_yaml_writes_them(tiny_recipe, tmp_path):
    recipe = load_recipe(tiny_recipe(), ["generator.lr=1e-4", "retriever.temperature=1", "train.betas=[0.8, 0.9]",
                                         f"data.dir={tmp_path}", "index.dir=indexes"])
    assert recipe.generator.options.lr == 1e-4 and recipe.retriever.options.temperature == 1.0
    assert recipe.train.betas == (0.8, 0.9) and recipe.data.dir == tmp_path
    assert recipe.index.options.dir == Path("indexes")


def test_yaml_anchors_and_merge_keys_still_work(tiny_recipe, tmp_path):
    base = tiny_recipe("base.yaml")
    child = _write(tmp_path, f"extends: {base.name}\ntrain: &steps\n  max_steps: 9\neval:\n  <<: {{max_examples: 3}}\n"
                             "  batch_size: 2\n", "child.yaml")
    recipe = load_recipe(child)
    assert (recipe.train.max_steps, recipe.eval.max_examples, recipe.eval.batch_size) == (9, 3, 2)


def test_a_packaged_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("tiny_rag")
    assert recipe.estimator.name == "rag" and recipe.output_dir == Path("runs/tiny_rag")
    assert load_recipe("dialog_rag.yaml").estimator.name == "rag"  # extends dialog_jsa.yaml beside it
    with pytest.raises(RecipeError, match=r"recipe file not found: tiny_rgb \(nor is 'tiny_rgb' a packaged recipe: "
                                          r"dialog_jsa, dialog_rag, .*tiny_rag\)"):
        load_recipe("tiny_rgb")
    (tmp_path / "tiny_rag.yaml").write_text("extends: nothing.yaml\n")  # a file of that name here comes first
    with pytest.raises(RecipeError, match=r"nothing.yaml"):
        load_recipe("tiny_rag.yaml")


@pytest.mark.parametrize("tool", ["bench_quality", "bench_estimators", "bench_step"])
def test_a_benchs_default_recipe_is_found_outside_a_source_checkout(tool, tmp_path, monkeypatch):
    """An installed wheel has no recipes/ folder beside the caller: a bench's default --config is a packaged name."""
    parser = argparse.ArgumentParser()
    importlib.import_module(f"jsarag.tools.{tool}").add_arguments(parser)
    monkeypatch.chdir(tmp_path)
    assert load_recipe(parser.get_default("config")).estimator.name


def test_the_qa_recipe_reads_the_embedded_squad():
    from jsarag.kb import load_kb

    recipe = load_recipe("qa_jsa")
    assert recipe.data.dir is None and recipe.data.embedded == "squad_v1.1"
    kb = load_kb(recipe.data.kb_source())
    assert len(kb) == 4497 and kb.has("squad-Super_Bowl_50-0")
    assert recipe.data.split_source("dev").name == "dev.jsonl.gz"
