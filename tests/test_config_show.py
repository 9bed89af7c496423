"""Options you can see: `jsarag config show` prints a resolved recipe, every key under its comment, that loads back
as the same recipe; `jsarag plugins --options NAME` lists a component's options with types, defaults and docs."""
from __future__ import annotations

import pytest
import yaml

from conftest import run_cli
from jsarag.plugins import Plugins
from jsarag.recipe import load_recipe, validate
from jsarag.tools.config import describe_component, show


@pytest.mark.parametrize("name", ["dialog_jsa", "tiny_rag", "qa_jsa", "dialog_rag"])
def test_a_shown_recipe_loads_back_as_the_same_recipe(name):
    recipe = load_recipe(name, ["train.max_steps=7", "posterior=prior"] if name == "dialog_jsa" else [])
    text = show(recipe)
    again = validate(yaml.safe_load(text), {"": "shown"}, Plugins())
    assert again.resolved() == recipe.resolved()


def test_every_key_is_shown_with_its_default_under_its_comment():
    text = show(load_recipe("tiny_rag", ["train.max_steps=5"]))
    lines = text.splitlines()
    at = lines.index("  max_steps: 5")
    assert lines[at - 1] == "  # Optimizer steps in total."  # TrainConfig.max_steps's docstring
    assert "  # Gradient-norm clipping (0 = off).\n  grad_clip: 1.0" in text  # a default the recipe never wrote
    assert "  # Learning rate of the query encoder (0 freezes it).\n  lr: 1.0e-05" in text  # a plugin option
    assert "    # Adapter rank." not in text and "  lora: null" in text  # tiny_rag trains the whole generator
    assert "# p(y|x,h); generator 'causal_lm': A causal LM that scores and decodes answers given a passage." in text
    keys = [line.split(":")[0].strip() for line in lines if line and not line.lstrip().startswith(("#", "-"))]
    assert {"output_dir", "resume", "nprobe", "decode_score", "max_nonfinite", "posterior_sep"} <= set(keys)


def test_config_show_from_the_command_line(tmp_path):
    done = run_cli("config", "show", "dialog_jsa", "generator.lora.r=4")
    shown = yaml.safe_load(done.stdout)
    assert shown["generator"]["lora"] == {"r": 4, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear",
                                          "last_layers": 8}
    bad = run_cli("config", "show", "dialog_jsa", "train.max_stepz=4", check=False)
    assert bad.returncode == 2 and "train.max_stepz: unknown key; did you mean 'train.max_steps'?" in bad.stderr


def test_plugins_options_lists_types_constraints_defaults_and_docs():
    text = describe_component(Plugins(), "causal_lm")
    assert text.startswith("generator 'causal_lm': jsarag_plugins.generators.causal_lm.CausalLM")
    assert "  lora.r: int (>= 1) = 8\n      Adapter rank." in text
    assert "  dtype: 'float32' | 'bfloat16' | 'auto' = auto\n" in text
    assert "  lora: LoraOptions | null = null\n" in text
    assert "  temperature: float (> 0) = 0.1\n      τ: logits are cosine / τ." in describe_component(Plugins(), "dense")
    assert "  dir: 'kb' | path | null = null" in describe_component(Plugins(), "faiss")  # IndexOptions, inherited
    done = run_cli("plugins", "--options", "wandb")
    assert "observer 'wandb'" in done.stdout and "  mode: 'offline' | 'online' | 'disabled' = offline" in done.stdout
    unknown = run_cli("plugins", "--options", "dens", check=False)
    assert unknown.returncode == 2 and "jsarag: error: no component named 'dens'; registered: bm25" in unknown.stderr
