"""Run reports: the ``report`` observer writes report.md and PNG curves; ``jsarag compare`` sets runs side by side."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from jsarag.api import Context
from jsarag.errors import JsaragError
from jsarag.plugins import Plugins
from jsarag.recipe import load_recipe
from jsarag.tools.compare import compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SAMPLE = {"id": "ex-1", "question": "How long do I boil an egg?", "answer": "about ten minutes",
          "prediction": "ten minutes",
          "retrieved": [{"id": "p7", "title": "Eggs", "text": "Boil eggs for ten minutes. " * 20, "gold": True},
                        {"id": "p2", "title": "", "text": "Rice needs water.", "gold": False}]}


def _history() -> list[dict]:
    return [{"step": 0, "dev": {"em": 0.10, "f1": 0.20, "recall@1": 0.25}},
            {"step": 4, "dev": {"em": 0.15, "f1": 0.30, "recall@1": 0.50}},
            {"step": 8, "dev": {"em": 0.25, "f1": 0.45, "recall@1": 0.75}}]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, (path, len(data))


def _observe_fake_run(recipe_path: Path, output_dir: Path) -> None:
    """Feed a fake training (8 JSA-like steps, three evaluations) through the report observer's hooks."""
    recipe = load_recipe(recipe_path)
    ctx = Context(role="report", kb=None, output_dir=output_dir, cache_dir=output_dir, device=torch.device("cpu"),
                  recipe=recipe.resolved(), recipe_source=recipe.source)
    cls = Plugins().component("observer", "report").cls
    report = cls(cls.Options(), ctx)
    history = _history()
    report.on_train_start(start_step=0, max_steps=8)
    for step in range(1, 9):
        report.on_step_end(step=step, loss=5.0 / step, stats={"acceptance": 0.1 * step, "ess": 2.0,
                                                              "unique_states": 1.5, "lr/prior.encoder": 1e-3 / step})
        record = next((r for r in history if r["step"] == step), None)
        if record:
            report.on_eval_end(step=step, split="dev", metrics=record["dev"], samples=[SAMPLE])
    report.on_train_end(step=8, metrics={"final": {"dev": history[-1]["dev"]}, "history": history})


def test_report_observer_writes_markdown_and_plots(tiny_recipe, tmp_path):
    recipe = tiny_recipe(estimator={"name": "rag", "likelihood": "mean"}, data={"drop_unanswerable": False},
                         train={"max_steps": 8}, observers=["report"])
    _observe_fake_run(recipe, tmp_path / "run")
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| dev | em | 10.00 | 25.00 | +15.00 |" in report  # first -> last, change in points
    assert "| split | metric | before training (step 0) | after training (step 8) | change (points) |" in report
    assert "| dev | recall@1 | 25.00 | 75.00 | +50.00 |" in report
    assert "| 4 | dev | 15.00 | 30.00 | 50.00 |" in report  # every evaluation
    assert "CANNOTANSWER turns: kept" in report and "generator likelihood: `mean`" in report
    assert "How long do I boil an egg?" in report and "prediction: ten minutes" in report
    assert "`p7` ✓ Eggs: Boil eggs" in report and "…" in report  # long passages are cut
    assert "```yaml\n" in report and "  likelihood: mean\n" in report  # the recipe as YAML
    for name in ("loss", "learning_rate", "acceptance", "ess", "unique_states", "eval_metrics"):
        _assert_png(tmp_path / "run" / "plots" / f"{name}.png")
        assert f"](plots/{name}.png)" in report


def test_step_plots_label_whole_steps_and_smooth_the_loss_beside_the_raw_one():
    from jsarag_plugins.observers.plots import integer_steps, new_figure, smoothing_window

    ax = new_figure().add_subplot()
    ax.plot([1, 2, 3], [3.0, 2.0, 1.0])
    integer_steps(ax)
    ax.figure.canvas.draw()
    assert all(tick == int(tick) for tick in ax.get_xticks()), ax.get_xticks()  # 1, 2, 3: not 1.25, 1.5, ...
    assert [smoothing_window(n) for n in (3, 4, 8, 50, 5000)] == [1, 2, 2, 5, 100]


def _fake_run(folder: Path, step: int, dev: dict[str, float], finished: bool = True) -> Path:
    folder.mkdir(parents=True)
    history = [{"step": 0, "dev": {k: 0.0 for k in dev}}, {"step": step, "dev": dev}]
    metrics = {"final": {"dev": dev} if finished else {}, "history": history, "nonfinite_skipped": 0}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_compare_prints_runs_side_by_side_and_plots(tmp_path):
    rag = _fake_run(tmp_path / "rag", 60, {"em": 0.125, "f1": 0.3, "recall@1": 0.4})
    jsa = _fake_run(tmp_path / "jsa", 40, {"em": 0.25, "f1": 0.2}, finished=False)
    done = run_cli("compare", str(rag), str(jsa), "--plot", str(tmp_path / "cmp.png"))
    lines = done.stdout.splitlines()
    assert lines[0] == "| run | step | split | em | f1 | recall@1 |"
    assert f"| {rag} | 60 | dev | 12.50 | **30.00** | 40.00 |" in lines  # bold: the better of two
    assert f"| {jsa} | 40 (unfinished) | dev | **25.00** | 20.00 |  |" in lines
    _assert_png(tmp_path / "cmp.png")


def test_compare_names_a_folder_without_metrics(tmp_path):
    ok = _fake_run(tmp_path / "ok", 10, {"em": 0.5})
    (tmp_path / "empty").mkdir()
    with pytest.raises(JsaragError, match=r"empty: no metrics.json here"):
        compare([ok, tmp_path / "empty"])
    done = run_cli("compare", str(ok), str(tmp_path / "missing"), check=False)
    assert done.returncode == 2 and f"jsarag: error: {tmp_path / 'missing'}: no metrics.json" in done.stderr


def test_a_real_training_writes_its_report(tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 4}, eval={"at_start": True}, observers=["progress", "jsonl_log", "report"])
    done = run_cli("train", "--config", str(recipe))
    out = tmp_path / "run"
    report = (out / "report.md").read_text()
    assert "4 of 4 steps, finished" in report and "| dev | recall@1 |" in report and "retrieved (prior top" in report
    for name in ("loss", "eval_metrics"):
        _assert_png(out / "plots" / f"{name}.png")
    assert not (out / "plots" / "acceptance.png").exists()  # rag reports no acceptance rate
    assert "eta=" in done.stderr and f"report:  {out / 'report.md'}" in done.stdout  # plain log lines off a terminal
