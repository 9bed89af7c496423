"""Experiment trackers, read back with their own libraries: a run stopped and resumed sends TensorBoard, Weights &
Biases (offline, no network) and CSV the loss, each loss term, the learning rates, the estimator's statistics and
every evaluation's metrics, each step once; a run that fails still finishes its W&B run."""
from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
import yaml

from conftest import read_log, run_cli, tiny_recipe_dict

TRACKERS = ["jsonl_log", "tensorboard", {"name": "wandb", "project": "tests"}, "csv"]
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": ""}  # and no network here anyway


def wandb_records(path: Path) -> list:
    """The records of a W&B offline run file (``run-<id>.wandb``): a 7-byte header, then LevelDB-style log blocks of
    32 KiB, each record a 7-byte header (crc, length, type: full, first, middle, last) and a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), f"{path} is not a W&B run file"
    payloads, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack_from("<IHB", data, pos) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at the end of a block
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            payloads.append(pending + chunk if kind == 4 else chunk)
        pending = chunk if kind == 2 else pending + chunk if kind == 3 else b""
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def wandb_history(run_dir: Path) -> tuple[dict[int, dict[str, float]], list[int]]:
    """Every offline W&B run file of a run folder, oldest first: the scalars logged by step, and the exit codes."""
    history: dict[int, dict[str, float]] = {}
    exits = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.setdefault(int(items.pop("_step")), {}).update(
                    {k: v for k, v in items.items() if not k.startswith("_")})
            elif kind == "exit":
                exits.append(record.exit.exit_code)
    return history, exits


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard folder, read with tensorboard's own EventAccumulator: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tracked_run(tiny_data, tmp_path_factory) -> Path:
    """JSA, 4 steps, evaluated at 0, 2 and 4, stopped after step 2 and resumed, with every tracker."""
    folder = tmp_path_factory.mktemp("tracked")
    recipe = tiny_recipe_dict(tiny_data, folder / "run", "jsa")
    recipe.update(observers=TRACKERS, posterior={"lr": 1e-3},
                  train={**recipe["train"], "max_steps": 4, "eval_every": 2, "checkpoint_every": 2},
                  eval={**recipe["eval"], "at_start": True})
    recipe["estimator"].update(proposals=8)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_cli("train", "--config", str(path), "train.stop_at=2", env=OFFLINE)
    run_cli("train", "--config", str(path), env=OFFLINE)
    return folder / "run"


def expected(run_dir: Path) -> dict[int, dict[str, float]]:
    """What every tracker must hold, by step, from train_log.jsonl and metrics.json."""
    steps: dict[int, dict[str, float]] = {}
    for record in read_log(run_dir):
        scalars = {f"train/{k}" if not k.startswith("lr/") else k: v for k, v in record.items()
                   if k not in ("step", "time")}
        steps[record["step"]] = scalars
    for evaluation in json.loads((run_dir / "metrics.json").read_text())["history"]:
        steps.setdefault(evaluation["step"], {}).update({f"dev/{k}": v for k, v in evaluation["dev"].items()})
    return steps


def test_the_steps_carry_loss_terms_learning_rates_and_estimator_statistics(tracked_run):
    names = set(expected(tracked_run)[3])
    assert {"train/loss", "train/generator_nll", "train/prior_nll", "train/posterior_nll"} <= names  # loss terms
    assert {"train/acceptance", "train/unique_states", "train/ess", "train/cache_hit", "train/chain_gold"} <= names
    assert {"lr/prior.query_encoder", "lr/posterior.query_encoder", "lr/generator.generator"} <= names
    assert {"dev/recall@1", "dev/f1"} <= set(expected(tracked_run)[0]) and "train/loss" not in expected(tracked_run)[0]


def test_tensorboard_holds_every_scalar_once(tracked_run):
    scalars = tensorboard_scalars(tracked_run / "tensorboard")
    want = expected(tracked_run)
    tags = {tag for values in want.values() for tag in values}
    assert set(scalars) == tags
    for tag, points in scalars.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), f"{tag}: a step twice after the resume: {steps}"
        for step, value in points:
            assert value == pytest.approx(want[step][tag], rel=1e-6, abs=1e-6), (tag, step)  # stored as float32
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4] and [s for s, _ in scalars["dev/f1"]] == [0, 2, 4]


def test_wandb_offline_holds_every_scalar_and_finished(tracked_run):
    history, exits = wandb_history(tracked_run)
    assert history == expected(tracked_run)
    assert exits == [0, 0]  # both invocations finished their run (one run id: the resume continues it)
    ids = {p.name.rsplit("-", 1)[1] for p in tracked_run.glob("wandb/offline-run-*")}
    assert len(ids) == 1 and (tracked_run / "wandb-run-id").read_text() in ids


def test_csv_holds_every_scalar_once(tracked_run):
    with (tracked_run / "scalars.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    got: dict[int, dict[str, float]] = {}
    for row in rows:
        assert row["tag"] not in got.get(int(row["step"]), {}), f"{row['tag']} twice at step {row['step']}"
        got.setdefault(int(row["step"]), {})[row["tag"]] = float(row["value"])
    assert got == expected(tracked_run)


def test_a_failed_run_still_finishes_its_wandb_run_and_closes_its_files(tiny_recipe, tmp_path):
    # lr 1e30 without clipping: every loss after the first step is inf or NaN, and the run stops at step 2
    recipe = tiny_recipe(generator={"lr": 1e30}, observers=["tensorboard", "wandb", "csv"],
                         train={"max_steps": 6, "grad_clip": 0, "max_nonfinite": 2})
    done = run_cli("train", "--config", str(recipe), check=False, env=OFFLINE)
    assert done.returncode == 2 and "non-finite losses in a row" in done.stderr
    history, exits = wandb_history(tmp_path / "run")
    assert list(history) == [1] and "train/loss" in history[1]
    assert exits == [1]  # finished, with the failure's exit code, before the process's os._exit
    assert [s for s, _ in tensorboard_scalars(tmp_path / "run" / "tensorboard")["train/loss"]] == [1]
    assert (tmp_path / "run" / "scalars.csv").read_text().splitlines()[1].startswith("1,")


def test_a_missing_tracker_library_is_a_recipe_error_at_validation(tiny_recipe, monkeypatch):
    import importlib.util

    from jsarag.errors import RecipeError
    from jsarag.recipe import load_recipe

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "wandb" else found(name, *rest))
    with pytest.raises(RecipeError, match=r"observers.0: the wandb observer needs the 'wandb' package, which is not "
                                          r"installed: pip install \"jsarag\[trackers\]\" \(.*recipe.yaml line"):
        load_recipe(tiny_recipe(observers=[{"name": "wandb"}]))
