"""`jsarag bench quality` end to end on tiny models: real training runs, their aggregates, reuse and failures."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import read_log, run_cli, tiny_recipe_dict
from jsarag.data import default_data_dir
from jsarag.errors import DataError, RecipeError
from jsarag.tools.bench_quality import _table, check_labels, check_owned, parse_datasets, parse_seeds, spread

ESTIMATORS, SEEDS = ("rag", "jsa"), (0, 1)
OVERRIDES = ("train.max_steps=2", "eval.max_examples=4")


@pytest.fixture
def bench_recipe(tiny_data, tmp_path) -> Path:
    """The tiny recipe with a posterior retriever (for jsa), as a YAML file."""
    recipe = tiny_recipe_dict(tiny_data, tmp_path / "unused")
    recipe["posterior"] = {"lr": 1e-3}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def bench(recipe: Path, data: Path, out: Path, *extra: str, check: bool = True, estimators=ESTIMATORS, seeds=SEEDS):
    """Run `jsarag bench quality` over one dataset called tiny."""
    return run_cli("bench", "quality", "--config", str(recipe), "--estimators", ",".join(estimators),
                   "--datasets", f"tiny={data}", "--seeds", ",".join(map(str, seeds)), "--out", str(out),
                   *OVERRIDES, *extra, check=check)


def snapshot(out: Path) -> dict[str, tuple[int, int, int]]:
    """Size, modification time (ns) and inode of every file of the run folders."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(out.rglob("*")) if p.is_file() and not p.name.startswith("quality.")}


def test_bench_quality_trains_aggregates_and_reuses(bench_recipe, tiny_data, tmp_path):
    out = tmp_path / "bench"
    first = bench(bench_recipe, tiny_data, out, "jsa.proposals=8")
    report = json.loads((out / "quality.json").read_text())
    markdown = (out / "quality.md").read_text()
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown.strip() in first.stdout  # the Markdown is printed at the end
    assert {"platform", "cpus", "gpu"} <= set(report["machine"]) and "bench quality" in report["command"]
    options = {label: e["options"] for label, e in report["settings"]["estimators"].items()}
    assert options["jsa"]["proposals"] == 8 and options["rag"] == {"likelihood": "sum"}

    runs = {(r["estimator"], r["seed"]): r for r in report["runs"]}
    assert set(runs) == {(e, s) for e in ESTIMATORS for s in SEEDS}
    for (label, seed), run in runs.items():
        folder = Path(run["output_dir"])
        assert folder == out / "tiny" / label / f"seed{seed}"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert run["split"] == "dev" and run["step"] == 2 and run["examples"] == 4  # tiny data has no test split
        assert run["metrics"] == metrics["final"]["dev"] and not run["reused"] and run["wall_s"] > 0
    for label in ESTIMATORS:  # each run trained its own estimator with its own seed
        logs = [read_log(out / "tiny" / label / f"seed{seed}") for seed in SEEDS]
        assert all(("acceptance" in log[0]) == (label == "jsa") for log in logs)
        assert [r["loss"] for r in logs[0]] != [r["loss"] for r in logs[1]]

    for label in ESTIMATORS:
        cells = report["aggregates"]["tiny"][label]
        assert set(cells) == {"recall@1", "recall@10", "mrr@10", "em", "f1", "bleu1", "bleu4", "rougeL", "wall_s"}
        for name, cell in cells.items():
            values = [runs[label, s]["wall_s"] if name == "wall_s" else runs[label, s]["metrics"][name] for s in SEEDS]
            assert cell["n"] == 2
            assert cell["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert cell["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
            if name != "wall_s":
                assert f"{100 * cell['mean']:.2f} ± {100 * cell['std']:.2f}" in markdown
    assert "`dev` split, 4 examples scored; 2 step(s)" in markdown and "over 2 seeds" in markdown
    gains = report["significance"]["tiny"]  # jsa minus the only other estimator, paired over the 4 examples
    for name, cell in report["aggregates"]["tiny"]["jsa"].items():
        if name != "wall_s":
            g = gains[name]
            assert g["baseline"] == "rag" and g["examples"] == 4 and g["seeds"] == 2
            assert g["diff"] == pytest.approx(cell["mean"] - report["aggregates"]["tiny"]["rag"][name]["mean"],
                                              abs=1e-6)
            assert g["ci95"][0] <= g["diff"] + 1e-9 and g["diff"] <= g["ci95"][1] + 1e-9
    assert "minus the best other estimator per metric" in markdown

    before = snapshot(out)
    second = bench(bench_recipe, tiny_data, out, "jsa.proposals=8")
    assert second.stdout.count("reused (finished earlier)") == 4 and "training into" not in second.stdout
    assert snapshot(out) == before  # no run started: every log, checkpoint and metrics file is untouched
    again = json.loads((out / "quality.json").read_text())
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in report["runs"]]
    assert all(r["reused"] for r in again["runs"])

    changed = bench(bench_recipe, tiny_data, out, "jsa.proposals=8", "train.max_steps=3", check=False)
    assert changed.returncode == 2 and "train.max_steps" in changed.stderr and "other settings" in changed.stderr
    assert snapshot(out) == before


def test_bench_quality_stops_on_a_failed_run(bench_recipe, tiny_data, tmp_path):
    data = tmp_path / "broken"
    shutil.copytree(tiny_data, data)
    (data / "train.jsonl").write_text("this is not JSON\n")
    out = tmp_path / "bench"
    done = bench(bench_recipe, data, out, check=False, estimators=("rag",), seeds=(0,))
    assert done.returncode == 2
    assert "the run rag on tiny with seed 0 exited" in done.stderr
    assert "  | " in done.stderr and "train.jsonl" in done.stderr  # the run's own error, from its last lines
    assert not (out / "quality.json").exists()


def test_bench_quality_refuses_bad_arguments(tmp_path):
    with pytest.raises(RecipeError, match="--seeds"):
        check_owned(["train.seed=3"])
    with pytest.raises(RecipeError, match="--estimators"):
        check_owned(["estimator.proposals=3"])
    check_owned(["train.max_steps=3", "data.max_history_turns=0"])
    with pytest.raises(RecipeError, match="'jsa' is not among --estimators"):
        check_labels(["jsa.proposals=8"], {"rag", "jsa"})
    check_labels(["train.max_steps=3"], {"rag", "jsa", "train"})  # a recipe section stays a recipe key
    with pytest.raises(RecipeError, match="NAME=DATA_DIR"):
        parse_datasets("squad")
    with pytest.raises(DataError, match="neither a test nor a dev split"):
        parse_datasets(f"empty={tmp_path}")
    (tmp_path / "dev.jsonl").write_text("")
    assert parse_datasets(f"x={tmp_path}")[0].split == "dev"
    (tmp_path / "test.jsonl").write_text("")
    assert parse_datasets(f"x={tmp_path},doqa=")[0].split == "test"
    assert parse_datasets("doqa=")[0].dir is None
    squad = parse_datasets("squad=squad_v1.1")[0]  # an embedded dataset by name
    assert squad.dir == default_data_dir("squad_v1.1") and squad.split == "dev"
    with pytest.raises(RecipeError, match="each once"):
        parse_seeds("0,0")


def test_one_seed_has_no_spread_and_ties_no_winner():
    assert spread([0.25]) == {"mean": 0.25, "std": None, "n": 1}
    assert spread([0.2, 0.4])["std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    one_seed = {"rag": {"f1": spread([0.25]), "em": spread([0.1])}, "jsa": {"f1": spread([0.5]), "em": spread([0.1])}}
    table = _table(one_seed)  # metrics in the report's order (em before f1), a tie (em) bold nowhere
    assert "| rag | 10.00 | 25.00 |" in table and "| jsa | 10.00 | **50.00** |" in table and "±" not in table
