"""The layers read from the imports: plugins import only the public API, the core imports no tool and no plugin,
tools take no private names, the core has no import cycle, and listing plugins or validating a recipe loads no heavy
library."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

CORE = sorted(p for p in (REPO / "jsarag").glob("*.py") if p.stem not in ("cli", "__main__"))  # cli: the command
# layer above the core and the tools, which dispatches to both
TOOLS = sorted((REPO / "jsarag" / "tools").glob("*.py"))
PLUGINS = sorted((REPO / "plugins").rglob("*.py"))
HEAVY = ("transformers", "sentence_transformers", "faiss", "datasets", "matplotlib", "deepspeed", "peft", "bm25s")


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names, at module level) of every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1]).replace("plugins", "jsarag_plugins", 1)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [module]).strip(".")
            found.append((module, [alias.name for alias in node.names], id(node) in top))
    return found


def test_plugins_import_only_the_public_api():
    wrong = [f"{path.relative_to(REPO)}: {module}" for path in PLUGINS for module, _, _ in imports(path)
             if module.startswith("jsarag.") and module != "jsarag.api" or module == "jsarag.tools"]
    assert not wrong, "plugins reach into the core: " + "; ".join(wrong)


def test_the_core_imports_no_tool_and_no_plugin():
    wrong = [f"{path.name}: {module}" for path in CORE for module, _, _ in imports(path)
             if module.startswith(("jsarag.tools", "jsarag_plugins"))]
    assert not wrong, "; ".join(wrong)


def test_tools_take_no_private_names():
    wrong = [f"{path.name}: {module}.{name}" for path in TOOLS for module, names, _ in imports(path)
             for name in names if name.startswith("_") and module.startswith("jsarag")]
    assert not wrong, "tools use internals: " + "; ".join(wrong)


def test_the_api_module_does_not_import_the_run_or_the_recipe():
    modules = {module for module, _, at_top in imports(REPO / "jsarag" / "api.py") if at_top}
    assert not modules & {"jsarag.recipe", "jsarag.run", "jsarag.loop", "jsarag.engine", "jsarag.plugins"}


def test_the_core_has_no_import_cycle():
    graph = {path.stem: {module.split(".")[1] for module, _, at_top in imports(path)
                         if at_top and module.startswith("jsarag.") and module.count(".") == 1}
             for path in CORE}

    def reaches(start: str, seen: tuple[str, ...]) -> list[str] | None:
        for nxt in sorted(graph.get(start, ())):
            if nxt in seen:
                return [*seen, nxt]
            cycle = reaches(nxt, (*seen, nxt))
            if cycle:
                return cycle
        return None

    for module in graph:
        cycle = reaches(module, (module,))
        assert cycle is None, " -> ".join(cycle)


def test_listing_plugins_and_validating_a_recipe_load_no_heavy_library():
    script = ("import json, sys; from jsarag.plugins import Plugins; from jsarag.recipe import load_recipe; "
              "Plugins().registry(); load_recipe('tiny_rag'); load_recipe('dialog_jsa'); "
              f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    help_text = subprocess.run([sys.executable, "-m", "jsarag", "--help"], capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "Train retrieval-augmented generation" in help_text.stdout
