"""Plugin discovery, selection, tracing and error attribution; a third-party package adds a retriever."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from jsarag import hookspecs
from jsarag.errors import PluginError
from jsarag.plugins import KINDS, Plugins

PACKAGE = Path(__file__).resolve().parent / "plugin_package"


@pytest.fixture(scope="module")
def third_party_plugin():
    """pip-install the example plugin package into this environment, as a user would; uninstall after."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(PACKAGE)], check=True)
    yield "jsarag-hashing"
    subprocess.run([*pip, "uninstall", "-y", "jsarag-hashing"], check=True)


def test_builtins_register_through_entry_points():
    registry = Plugins().registry()
    assert {"dense"} <= set(registry["retriever"]) and "rag" in registry["estimator"]
    assert registry["generator"]["causal_lm"].package == "jsarag"


def test_every_hook_is_documented_and_typed():
    for name in dir(hookspecs):
        hook = getattr(hookspecs, name)
        if callable(hook) and hasattr(hook, "jsarag_spec"):
            assert hook.__doc__ and len(hook.__doc__.strip().splitlines()) == 1, name
            assert hook.__annotations__.get("return"), name
    assert set(KINDS.values()) <= set(dir(hookspecs))


def test_load_plugins_env_limits_what_loads(monkeypatch):
    monkeypatch.setenv("JSARAG_LOAD_PLUGINS", "rag,faiss")
    registry = Plugins().registry()
    assert set(registry["estimator"]) == {"rag"} and registry["retriever"] == {}


def test_unknown_component_lists_registered_names():
    with pytest.raises(PluginError, match=r"unknown estimator 'jsa2'; registered estimators: .*rag"):
        Plugins().component("estimator", "jsa2")


def test_exception_in_a_hook_names_the_plugin():
    class Broken:
        @hookspecs.hookimpl
        def sample(self, batch, candidates):
            raise ZeroDivisionError("boom")

    plugins = Plugins(load_entry_points=False)
    plugins.add(Broken(), "estimator:broken")
    with pytest.raises(PluginError, match=r"plugin 'estimator:broken' raised in hook sample: ZeroDivisionError: boom"):
        plugins.call("sample", batch=None, candidates=None)


def test_trace_prints_each_hook_call(monkeypatch, capsys):
    monkeypatch.setenv("JSARAG_TRACE_PLUGINS", "1")
    Plugins().registry()
    assert "[jsarag trace] register_retrievers -> dense" in capsys.readouterr().err


def test_third_party_retriever_is_listed_and_trains(third_party_plugin, tiny_recipe, tmp_path):
    listing = run_cli("plugins").stdout
    assert "hashing" in listing and f"package {third_party_plugin}" in listing
    recipe = tiny_recipe(retriever={"name": "hashing", "dim": 64, "top_k": 4}, train={"max_steps": 3})
    run_cli("train", "--config", str(recipe))
    assert (tmp_path / "run" / "metrics.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "step-0000003").is_dir()
