"""`jsarag bench estimators`: the planted task's data, the start models, and a tiny end-to-end bench (real runs)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from jsarag.errors import DataError
from jsarag.tools.bench_estimators import noisy_encoder
from jsarag.tools.planted import CITIES, planted_data, write_planted


def test_planted_answers_need_their_passage_and_dev_asks_about_other_people(tmp_path):
    data = planted_data(40, 0.25, seed=3)
    passages = {p["id"]: p["text"] for p in data["passages"]}
    assert len(passages) == 40 and len(set(passages.values())) == 40
    people = {}
    for split in ("train", "dev"):
        for ex in data[split]:
            (gold,) = ex["gold_passage_ids"]
            city, _, name = passages[gold][:-2].partition(" is the home of ")
            assert ex["answer"] == city and city in CITIES and name in ex["question"]
            assert ex["answers"] == [city] and city not in ex["question"]
            people.setdefault(split, set()).add(gold)
    assert len(people["dev"]) == 10 and not people["dev"] & people["train"]
    assert len(data["dev"]) == 30 and len(data["train"]) == 90  # three wordings per person
    assert planted_data(40, 0.25, seed=3) == data and planted_data(40, 0.25, seed=4) != data
    folder = write_planted(tmp_path / "task", 40, 0.25, 3)
    assert write_planted(folder, 40, 0.25, 3) == folder  # the same task: reused
    with pytest.raises(DataError, match="other settings"):
        write_planted(folder, 41, 0.25, 3)


def test_noisy_encoders_start_from_the_passage_encoder(tmp_path, isolated_cache):
    from sentence_transformers import SentenceTransformer

    from jsarag.models import resolve_model

    texts = ["oslo is the home of zorvel kabex .", "where does zorvel kabex live ?"]
    plain = SentenceTransformer(str(resolve_model("jsarag/tiny-bert"))).encode(texts)
    same = SentenceTransformer(str(noisy_encoder(tmp_path / "zero", 0.0, seed=0))).encode(texts)
    noisy = SentenceTransformer(str(noisy_encoder(tmp_path / "one", 1.0, seed=0))).encode(texts)
    np.testing.assert_allclose(same, plain, atol=1e-6)
    assert np.abs(noisy - plain).max() > 0.1
    again = SentenceTransformer(str(noisy_encoder(tmp_path / "one-again", 1.0, seed=0))).encode(texts)
    np.testing.assert_allclose(again, noisy, atol=1e-6)  # seeded


def test_the_plan_gives_every_estimator_and_seed_its_own_run_from_the_seeds_start(tmp_path):
    import argparse

    from jsarag.tools.bench_estimators import add_arguments, plan, prepare_reader

    out = tmp_path / "bench"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(out), "--people", "16", "--estimators",
                                      "jsa_nocache:jsa,exact", "--seeds", "0,1", "jsa_nocache.proposals=4"])
    data = write_planted(out / "data", args.people, args.dev_share, args.data_seed)
    jobs, settings = plan(args, data, prepare_reader(out / "models" / "reader", 0, args.config, data))
    assert [(job.label, job.seed) for job, _ in jobs] == [(e, s) for e in ("jsa_nocache", "exact")
                                                          for s in (0, 1)]
    assert settings["estimators"]["jsa_nocache"]["options"]["cache"] is False  # the label's default
    assert settings["estimators"]["jsa_nocache"]["options"]["proposals"] == 4  # LABEL.key=value
    for job, name in jobs:
        recipe = job.recipe
        assert str(recipe.output_dir) == str(out.absolute() / job.label / f"seed{job.seed}")
        assert str(recipe.data.dir) == str(data) and recipe.train.seed == job.seed and recipe.estimator.name == name
        assert recipe.retriever.options.model.endswith(f"prior-noise1-seed{job.seed}")
        assert recipe.posterior.options.model.endswith(f"posterior-noise0.3-seed{job.seed}")
        assert (recipe.candidates.mode == "all") == (name == "exact")



def test_commands_sharing_out_build_a_start_model_once_and_leave_no_temporary_folder(tmp_path):
    import threading

    from filelock import FileLock

    from jsarag.models import resolve_model
    from jsarag.tools.bench_estimators import PASSAGE_ENCODER

    resolve_model(PASSAGE_ENCODER)  # the tiny BERT in the cache: what the build copies is there at once
    folder = tmp_path / "models" / "prior-noise1-seed0"
    folder.parent.mkdir()
    with FileLock(f"{folder}.lock"):  # another command is building it
        builder = threading.Thread(target=noisy_encoder, args=(folder, 1.0, 0))
        builder.start()
        builder.join(3)
        assert builder.is_alive()  # it waits, writing nothing beside the other command's build
        assert [p.name for p in folder.parent.iterdir()] == [f"{folder.name}.lock"]
    builder.join()
    assert (folder / "modules.json").is_file()
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, f"{folder.name}.lock"]

def test_bench_estimators_trains_reports_and_reuses_a_run(tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "estimators", "--out", str(out), "--people", "16", "--reader-steps", "3", "--estimators",
            "exact", "--seeds", "0", "train.max_steps=2", "train.eval_every=1"]
    first = run_cli(*args, timeout=600)
    report = json.loads((out / "estimators.json").read_text())
    assert (out / "estimators.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "estimators.md").read_text().strip() in first.stdout
    assert report["settings"]["start"]["reader"]["steps"] == 3
    (run,) = report["runs"]
    assert (run["estimator"], run["seed"]) == ("exact", 0)
    assert sorted(map(int, run["curves"])) == [0, 1, 2]  # evaluated at the start, every step, at the end
    recipe = json.loads((out / "exact" / "seed0" / "bench_quality.json").read_text())["recipe"]
    assert recipe["data"]["dir"] == str(out / "data") and recipe["candidates"]["mode"] == "all"
    exact = report["aggregates"]["exact"]
    assert set(exact["curves"]) == {"recall@1", "em"} and exact["final"]["recall@1"]["n"] == 1
    assert exact["final"]["em"]["mean"] == run["curves"]["2"]["em"] and exact["final"]["em"]["std"] is None
    again = run_cli(*args, timeout=600)
    assert again.stdout.count("reused (finished earlier)") == 1
