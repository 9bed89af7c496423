"""The plugin contract: discovery, registration, the kinds' contracts checked before anything loads, incompatible
choices named, plugin errors attributed, tracing, and the README documenting every public hook and method."""
from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, tiny_recipe_dict
from jsarag import api
from jsarag.errors import PluginError, RecipeError
from jsarag.plugins import KINDS, Plugins, check_class
from jsarag.recipe import load_recipe
from jsarag_plugins.estimators.rag import Rag
from jsarag_plugins.retrievers.dense import DenseRetriever


def plugin_module(name: str, **hooks) -> types.ModuleType:
    """A plugin module whose registration hooks register the given classes, by kind."""
    module = types.ModuleType(name)
    for kind, classes in hooks.items():
        def register_all(register, _classes=classes):
            for component_name, cls in _classes.items():
                register(component_name, cls)

        register_all.__name__ = KINDS[kind]
        setattr(module, KINDS[kind], api.hookimpl(register_all))
    return module


def with_plugin(module: types.ModuleType) -> Plugins:
    """The installed plugins plus ``module``."""
    plugins = Plugins()
    plugins.add(module, module.__name__)
    return plugins


def test_builtins_register_through_entry_points():
    registry = Plugins().registry()
    assert {"dense", "bm25"} <= set(registry["retriever"]) and {"rag", "jsa", "vrag", "exact"} <= set(registry["estimator"])
    assert registry["generator"]["causal_lm"].package == "jsarag"
    for kind in registry.values():
        for entry in kind.values():
            check_class(entry)  # every built-in meets its kind's contract


def test_every_registration_hook_is_documented_and_typed():
    specs = [name for name, f in vars(api).items() if callable(f) and hasattr(f, "jsarag_spec")]
    assert sorted(specs) == sorted(KINDS.values())
    for name in specs:
        hook = getattr(api, name)
        assert hook.__doc__ and len(hook.__doc__.strip().splitlines()) == 1, name
        assert hook.__annotations__.get("return"), name


def test_load_plugins_env_limits_what_loads(monkeypatch):
    monkeypatch.setenv("JSARAG_LOAD_PLUGINS", "rag,faiss")
    registry = Plugins().registry()
    assert set(registry["estimator"]) == {"rag"} and registry["retriever"] == {}


def test_unknown_component_lists_registered_names():
    with pytest.raises(PluginError, match=r"unknown estimator 'jsa2'; registered estimators: .*rag"):
        Plugins().component("estimator", "jsa2")


def test_a_misspelt_registration_hook_is_refused_naming_the_plugin():
    module = types.ModuleType("typo_plugin")
    module.register_retriever = api.hookimpl(lambda register: None)  # missing "s"
    with pytest.raises(PluginError, match=r"plugin 'typo_plugin'.*register_retriever.*the hooks are register_retrievers"):
        Plugins(load_entry_points=False).add(module, "typo_plugin")


def test_a_class_of_another_kind_cannot_be_registered():
    plugins = with_plugin(plugin_module("wrong_kind", retriever={"oops": Rag}))
    with pytest.raises(PluginError, match=r"registered retriever 'oops' as .*Rag.*not a subclass of jsarag.api.Retriever"):
        plugins.registry()


class Misspelt(api.Retriever):
    def encode(self, texts):
        return texts

    def serach(self, queries, k, train):  # search, misspelt
        return torch.zeros(len(queries), k, dtype=torch.long)

    def score(self, queries, rows):
        return torch.zeros(rows.shape)


class Answering(api.Observer):
    def sample(self, batch, candidates):  # an observer answering the estimator's hook point
        return None

    def on_step_ends(self, step, loss, stats):  # a lifecycle event, misspelt
        pass


class NoUpdate(api.Estimator):
    def sample(self, batch, candidates):
        return api.ScoreRequest.all_slots(candidates)


class OwnRowsOnly(DenseRetriever):
    scores_any_rows = False


@pytest.mark.parametrize("kind, cls, message", [
    ("retriever", Misspelt, r"does not implement search \(is 'serach' a misspelling\?\)"),
    ("observer", Answering, r"defines sample, which is a hook point of estimators.*on_step_ends, which is no event "
                            r"\(did you mean on_step_end\?\)"),
    ("estimator", NoUpdate, r"does not implement update"),
])
def test_a_class_that_breaks_its_contract_fails_when_a_recipe_picks_it(kind, cls, message, tiny_recipe):
    plugins = with_plugin(plugin_module("broken", **{kind: {"broken": cls}}))
    section = {"observers": ["broken"]} if kind == "observer" else {kind: {"name": "broken"}}
    with pytest.raises(PluginError, match=message):
        load_recipe(tiny_recipe(**section), plugins=plugins)


def test_jsarag_plugins_marks_a_broken_component(tmp_path):
    from conftest import run_cli

    package = tmp_path / "broken_pkg"
    package.mkdir()
    (package / "broken_plugin.py").write_text(
        "from jsarag.api import Observer, hookimpl\n"
        "class Loud(Observer):\n    def update(self, *args):\n        pass\n"
        "@hookimpl\ndef register_observers(register):\n    register('loud', Loud)\n")
    dist = package / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[jsarag]\nloud = broken_plugin\n")
    listing = run_cli("plugins", env={"PYTHONPATH": str(package)}, fresh_process=True).stdout  # read at start
    assert re.search(r"loud .*package broken-plugin\)\n\s+BROKEN: it defines update, which is a hook point of "
                     r"estimators", listing)


@pytest.mark.parametrize("sections, message", [
    ({"estimator": {"name": "exact"}}, r"estimator 'exact' .* scores every passage: set candidates.mode: all"),
    ({"estimator": {"name": "jsa"}, "retriever": {"name": "own_rows"}},
     r"the prior, retriever 'own_rows' .* scores only the rows its own search returned, but estimator 'jsa' .*needs "
     r"it to score a posterior's rows and rows of its own"),
    ({"estimator": {"name": "vrag"}, "posterior": {"name": "own_rows"}},
     r"estimator 'vrag' .* needs a posterior that scores the prior's candidates, but the posterior, retriever "
     r"'own_rows'"),
])
def test_incompatible_choices_fail_at_validation_naming_both(sections, message, tiny_recipe):
    plugins = with_plugin(plugin_module("own_rows_plugin", retriever={"own_rows": OwnRowsOnly}))
    with pytest.raises(RecipeError, match=message):
        load_recipe(tiny_recipe(**sections), plugins=plugins)


def test_the_posterior_section_copies_the_prior_unless_told_otherwise(tiny_recipe):
    copied = load_recipe(tiny_recipe(estimator={"name": "jsa"}))
    assert copied.posterior.name == "dense" and copied.posterior.options == copied.retriever.options
    changed = load_recipe(tiny_recipe(estimator={"name": "jsa"}), ["posterior.lr=0.5"])
    assert changed.posterior.options.lr == 0.5 and changed.posterior.options.model == changed.retriever.options.model
    shared = load_recipe(tiny_recipe(estimator={"name": "jsa"}, posterior="prior"))
    assert shared.posterior.shares_prior
    other = load_recipe(tiny_recipe(estimator={"name": "jsa"}, posterior={"name": "bm25"}))
    assert other.posterior.name == "bm25"
    with pytest.raises(RecipeError, match=r"retriever.top_k: this key moved to candidates.prior_top_k"):
        load_recipe(tiny_recipe(retriever={"top_k": 3}))


class ExtraParameter(DenseRetriever):
    """The dense retriever with one more trainable module holding ``PARAMETER`` (set per test)."""

    PARAMETER: torch.nn.Parameter

    def trainable(self):
        holder = torch.nn.Module()
        holder.scale = self.PARAMETER
        return {**super().trainable(), "scale": api.Trainable(holder, 1e-3)}


class Failing(Rag):
    def sample(self, batch, candidates):
        raise ZeroDivisionError("boom")


@pytest.mark.parametrize("parameter, message", [
    (torch.nn.Parameter(torch.tensor(1.0)), r"parameter 'scale.scale' is 0-dimensional, which DeepSpeed cannot"),
    (torch.nn.Parameter(torch.ones(2), requires_grad=False), r"module 'scale' is listed as trainable \(lr 0.001\) but "
                                                            r"none of its parameters requires grad"),
    (torch.nn.Parameter(torch.ones(2, device="meta")), r"parameter 'scale.scale' is on meta, the run on cpu"),
], ids=["0-dim", "frozen", "wrong-device"])
def test_a_bad_trainable_fails_when_the_run_is_built_naming_plugin_and_parameter(tiny_recipe, parameter, message):
    from jsarag.run import build_run

    ExtraParameter.PARAMETER = parameter
    plugins = with_plugin(plugin_module("extra_plugin", retriever={"extra": ExtraParameter}))
    recipe = load_recipe(tiny_recipe(retriever={"name": "extra", "model": "jsarag/tiny-bert"}), plugins=plugins)
    with pytest.raises(RecipeError, match=r"prior, retriever 'extra' \(plugin extra_plugin.*" + message):
        build_run(recipe, plugins=plugins)


def test_an_exception_in_a_hook_point_names_the_component_and_plugin(tiny_recipe, monkeypatch, capsys):
    from jsarag.loop import LoopState, micro_step, next_batch
    from jsarag.run import build_run

    monkeypatch.setenv("JSARAG_TRACE_PLUGINS", "1")
    plugins = with_plugin(plugin_module("failing_plugin", estimator={"failing": Failing}))
    run = build_run(load_recipe(tiny_recipe(estimator={"name": "failing"}), plugins=plugins), engine=False,
                    plugins=plugins)
    batch = next_batch(run, LoopState())
    with pytest.raises(PluginError, match=r"estimator, estimator 'failing' \(plugin failing_plugin, package \?\), "
                                          r"raised in sample: ZeroDivisionError: boom"):
        micro_step(run, batch)
    trace = capsys.readouterr().err
    assert "[jsarag trace] register_estimators -> failing_plugin" in trace
    assert "[jsarag trace] retrieve -> prior retriever 'dense'" in trace
    assert "[jsarag trace] sample -> estimator estimator 'failing'" in trace


class Watcher(api.Observer):
    seen: list[str] = []

    def on_hook(self, name, batch, result):
        Watcher.seen.append(f"{name}:{type(result).__name__}")


def test_observers_watch_every_hook_point_and_answer_none(tiny_recipe):
    from jsarag.loop import LoopState, micro_step, next_batch
    from jsarag.run import build_run

    plugins = with_plugin(plugin_module("watch_plugin", observer={"watcher": Watcher}))
    run = build_run(load_recipe(tiny_recipe(estimator={"name": "jsa", "proposals": 4}, observers=["watcher"]),
                                plugins=plugins), engine=False, plugins=plugins)
    result = micro_step(run, next_batch(run, LoopState()))
    assert torch.isfinite(result.loss)
    assert Watcher.seen == ["retrieve:Candidates", "sample:ChainRequest", "score:Scores", "score:Scores",
                            "update:StepResult"]  # jsa's rescore pass is a second score call


def readme_plugin_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Writing a plugin")
    return text[start:text.index("\n## ", start + 1)]


def test_the_readme_documents_every_public_name_hook_and_method():
    """datasette's rule: a public part of the plugin API without a README entry fails here."""
    section = readme_plugin_section()

    def documented(name: str) -> bool:  # in code quotes, alone or called: `name`, `name(...)`, `Class.name`
        return re.search(rf"`(\w+\.)?{re.escape(name)}[`( ]", section) is not None

    missing = [name for name in api.__all__ if not documented(name)]
    for base in (api.Component, *api.BASES.values()):  # Component: what every kind inherits (events, export)
        for name, member in vars(base).items():
            if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)
                                             or name in base.__annotations__):
                if not documented(name):
                    missing.append(f"{base.__name__}.{name}")
    for name in ("Batch", "Candidates", "ScoreRequest", "Scores", "StepResult", "Context", "PassageIndex"):
        cls = getattr(api, name)
        members = [n for n, m in vars(cls).items() if not n.startswith("_") and (inspect.isfunction(m)
                   or isinstance(m, (property, classmethod)))]
        missing += [f"{name}.{member}" for member in [*getattr(cls, "__dataclass_fields__", {}), *members]
                    if not documented(member)]
    assert not missing, f"the README's 'Writing a plugin' section does not mention: {', '.join(sorted(set(missing)))}"


def test_the_readme_example_is_the_example_plugin():
    """The README shows the example plugin's code, so what it says was run."""
    section = readme_plugin_section()
    shown = re.search(r"```python\n# my_pkg/plugin\.py\n(.*?)```", section, re.S).group(1)
    source = (Path(__file__).parent / "plugin_package/src/jsarag_hashing/plugin.py").read_text()
    for line in shown.splitlines():
        if line.strip() and not line.strip().startswith("#") and line.strip() != "...":
            assert line.rstrip() in source, f"README line not in the example plugin: {line!r}"


def test_jsarag_plugins_lists_the_built_in_components_with_their_package():
    """Run in this process before the module's fixture installs the example plugin: the example-plugin tests below
    then meet what a worker that ran other commands first meets, and pass only if each command loads entry points
    afresh (a console-script process does; a manager cached from this command would not list the plugin)."""
    from conftest import run_cli

    listing = run_cli("plugins").stdout
    for kind, name in [("retrievers", "dense"), ("estimators", "jsa"), ("generators", "causal_lm")]:
        assert re.search(rf"^{kind}:\n(  .*\n)*?  {name} .*\(plugin \w+, package jsarag\)$", listing, re.M), (kind, name)
    assert "hashing" not in listing


@pytest.fixture(scope="module")
def third_party_plugin():
    """pip-install the example plugin package into this environment, as a user would; uninstall after."""
    import subprocess
    import sys

    package = Path(__file__).resolve().parent / "plugin_package"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(package)], check=True)
    yield "jsarag-hashing"
    subprocess.run([*pip, "uninstall", "-y", "jsarag-hashing"], check=True)


@pytest.fixture(scope="module")
def six_examples(tiny_data, tmp_path_factory):
    """The tiny data with 6 training examples: an epoch is 3 steps of 2, so chains meet their cache at step 4."""
    out = tmp_path_factory.mktemp("six")
    for name in ("passages.jsonl", "dev.jsonl"):
        (out / name).write_text((tiny_data / name).read_text())
    (out / "train.jsonl").write_text("".join((tiny_data / "train.jsonl").read_text().splitlines(True)[:6]))
    return out


@pytest.mark.parametrize("estimator, roles", [
    ("rag", {"retriever": {"name": "hashing", "dim": 64}}),
    ("vrag", {"retriever": {"name": "hashing", "dim": 64}}),
    ("jsa", {"retriever": {"name": "hashing", "dim": 64}}),
    ("jsa", {"posterior": {"name": "hashing", "dim": 64}}),
    ("exact", {"retriever": {"name": "hashing", "dim": 64}, "candidates": {"mode": "all"}}),
])
def test_the_example_plugin_trains_with_every_estimator_as_prior_and_posterior(third_party_plugin, six_examples,
                                                                               tmp_path, estimator, roles):
    from conftest import read_log, run_cli

    listing = run_cli("plugins").stdout
    assert "hashing" in listing and f"package {third_party_plugin}" in listing
    recipe = tiny_recipe_dict(six_examples, tmp_path / "run", estimator)
    recipe["estimator"].update({"proposals": 8} if estimator == "jsa" else {})
    for section, value in roles.items():
        recipe[section] = value if "name" in value else {**recipe[section], **value}  # another plugin: afresh
    recipe["train"]["max_steps"], recipe["eval"]["max_examples"] = 6, 2
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_cli("train", "--config", str(path))
    steps = read_log(tmp_path / "run")
    assert len(steps) == 6 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    if estimator == "jsa":
        assert [s["cache_hit"] for s in steps[:3]] == [0.0, 0.0, 0.0] and all(s["cache_hit"] > 0 for s in steps[3:])
