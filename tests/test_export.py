"""Models out: a LoRA run's checkpoints hold only what trains and resume bit for bit; `jsarag eval` reproduces the
run's own evaluation from a checkpoint without an optimizer; `jsarag export` writes folders that transformers, PEFT
and sentence-transformers load with the run's numbers; `jsarag ask` and `jsarag index search` answer with the
trained models; all of it also from a 2-rank ZeRO-3 run, in one process."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import assert_equal, load_pt, read_log, run_cli, tiny_recipe_dict

LORA_JSA = {"estimator": {"name": "jsa", "proposals": 8, "cache": True}, "posterior": {"lr": 1e-3},
            "generator": {"lora": {"r": 4, "alpha": 8}},
            "train": {"max_steps": 4, "eval_every": 2, "checkpoint_every": 2, "keep_checkpoints": 5},
            "eval": {"max_examples": 6, "at_start": True}}


def write_recipe(data_dir: Path, folder: Path, sections: dict[str, Any], name: str = "recipe.yaml") -> Path:
    """The tiny recipe with ``sections`` merged in, training into ``folder``/run."""
    recipe = tiny_recipe_dict(data_dir, folder / "run")
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(recipe.get(key), dict) else value
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def lora_run(tiny_data, tmp_path_factory) -> Path:
    """JSA with a LoRA generator, 4 steps, evaluated at 0, 2 and 4, checkpoints at 2 and 4 (one process, ZeRO-0)."""
    folder = tmp_path_factory.mktemp("lora-run")
    run_cli("train", "--config", str(write_recipe(tiny_data, folder, LORA_JSA)))
    return folder / "run"


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "merged"
    done = run_cli("export", str(lora_run), str(out))
    assert f"exported step 4 of {lora_run} to {out}" in done.stdout
    return out


def reference_run(run_dir: Path, tag: str):
    """The run rebuilt as training resumes it, with DeepSpeed's own checkpoint loader (strict but for the frozen
    parameters): the numbers exports are compared with."""
    from jsarag.recipe import load_recipe
    from jsarag.run import build_run

    run = build_run(load_recipe(run_dir / "recipe.yaml", ["observers=[]"]))
    run.engine.load_checkpoint(str(run_dir / "checkpoints"), tag=tag)
    run.engine.eval()
    return run


def dev_batch(run, n: int = 4):
    from jsarag.api import Batch

    examples = run.eval_sets["dev"]
    return Batch([examples[i] for i in range(n)], list(range(n)))


def hf_token_logprobs(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """(len(answer),) log p(answer token | prompt, earlier answer tokens) from a plain transformers model."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer).unsqueeze(-1)).squeeze(-1)


def run_token_logprobs(run, batch) -> tuple[list[tuple[list[int], list[int]]], list[torch.Tensor]]:
    """The run's generator's token log-likelihoods of each example's answer with each of its top passages."""
    from jsarag.api import ScoreRequest

    with torch.no_grad():
        candidates = run.rank(batch, 3)
        request = ScoreRequest.all_slots(candidates, grad=False)
        scores = run.generator.score(batch, candidates, request)
    pairs, values = [], []
    for n, (e, slot) in enumerate(zip(request.example.tolist(), request.slot.tolist())):
        row = int(candidates.rows[e, slot])
        pairs.append((run.generator.prompt_ids(batch, e, row), run.generator.answer_ids(batch.examples[e].answer)))
        values.append(scores.token_logprobs[n][scores.token_mask[n]])
    return pairs, values


# -- checkpoints hold what trains -----------------------------------------------------------------------------------

def test_a_lora_checkpoint_holds_only_what_trains(lora_run):
    saved = load_pt(lora_run / "checkpoints" / "step-0000004" / "mp_rank_00_model_states.pt")
    generator = [k for k in saved["module"] if k.startswith("generator.")]
    assert generator and all(".lora_" in k for k in generator), [k for k in generator if ".lora_" not in k][:5]
    assert not any("lm_head" in k or "wte" in k for k in saved["module"])  # the tied alias of the frozen embedding
    assert not saved["frozen_param_fragments"]
    trained = {k for k in saved["module"] if not k.startswith("generator.")}
    assert any(k.startswith("prior.query_encoder.") for k in trained)
    assert any(k.startswith("posterior.query_encoder.") for k in trained)


def test_stop_and_resume_of_a_lora_run_is_bit_exact(lora_run, tiny_data, tmp_path):
    recipe = write_recipe(tiny_data, tmp_path, LORA_JSA)
    run_cli("train", "--config", str(recipe), "train.stop_at=2")
    run_cli("train", "--config", str(recipe))  # resume: auto, from step 2, frozen base rebuilt from the model
    for name in ("mp_rank_00_model_states.pt", "loop_rank0.pt"):
        a, b = (load_pt(d / "checkpoints" / "step-0000004" / name) for d in (lora_run, tmp_path / "run"))
        a.pop("ds_config", None), b.pop("ds_config", None)  # names the output_dir's files
        run_a, run_b = a.pop("run", None), b.pop("run", None)  # the recipe (its output_dir) and the sessions' times
        if run_a is not None:
            assert {**run_a["recipe"], "output_dir": None} == {**run_b["recipe"], "output_dir": None}
        assert_equal(a, b, name)
    assert json.loads((lora_run / "metrics.json").read_text()) == json.loads((tmp_path / "run" / "metrics.json")
                                                                            .read_text())
    assert [r["loss"] for r in read_log(lora_run)] == [r["loss"] for r in read_log(tmp_path / "run")]


# -- jsarag eval ----------------------------------------------------------------------------------------------------

def test_eval_of_a_checkpoint_reproduces_the_runs_evaluation_and_writes_it(lora_run, tmp_path):
    out = tmp_path / "eval.json"
    done = run_cli("eval", "--config", str(lora_run / "recipe.yaml"), "--checkpoint", "step-2", "--out", str(out))
    assert "step 2 dev:" in done.stdout
    history = json.loads((lora_run / "metrics.json").read_text())["history"]
    at_2 = next(r for r in history if r["step"] == 2)
    result = json.loads(out.read_text())
    assert result["step"] == 2 and result["checkpoint"] == str(lora_run / "checkpoints" / "step-0000002")
    assert result["metrics"] == {"dev": at_2["dev"]}  # bit for bit: the same models as training had at step 2
    assert result["metrics"] != {"dev": next(r for r in history if r["step"] == 0)["dev"]}


def test_a_wrong_checkpoint_is_named_before_any_model_loads(lora_run):
    done = run_cli("eval", "--config", str(lora_run / "recipe.yaml"), "--checkpoint", "step-3", check=False)
    assert done.returncode == 2
    assert (f"jsarag: error: --checkpoint step-3: no complete checkpoint of that name in {lora_run / 'checkpoints'} "
            "(complete ones: step-0000002, step-0000004)") in done.stderr
    assert "Loading weights" not in done.stderr


# -- jsarag export --------------------------------------------------------------------------------------------------

def test_the_exported_generator_gives_the_runs_log_likelihoods(lora_run, exported):
    from transformers import AutoModelForCausalLM

    run = reference_run(lora_run, "step-0000004")
    pairs, expected = run_token_logprobs(run, dev_batch(run))
    model = AutoModelForCausalLM.from_pretrained(exported / "generator").eval()
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged into the base
    for (prompt, answer), want in zip(pairs, expected):
        torch.testing.assert_close(hf_token_logprobs(model, prompt, answer), want, rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(run.generator.model.peft_config["default"].base_model_name_or_path)
    (prompt, answer), want = pairs[0], expected[0]
    assert not torch.allclose(hf_token_logprobs(base.eval(), prompt, answer), want, atol=1e-3)  # training did move it


def test_the_exported_retrievers_give_the_runs_query_embeddings(lora_run, exported):
    from sentence_transformers import SentenceTransformer

    run = reference_run(lora_run, "step-0000004")
    texts = ["how long do I boil an egg?", "can I freeze fresh mint? [SEP] yes, in ice cubes"]
    for role in ("prior", "posterior"):
        with torch.no_grad():
            want = getattr(run, role).encode(texts).vectors
        got = SentenceTransformer(str(exported / role)).encode(texts, normalize_embeddings=True, convert_to_tensor=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    untrained = SentenceTransformer(str(exported / "prior" / "passage_encoder"))  # the frozen passage side
    assert not torch.allclose(untrained.encode(texts, convert_to_tensor=True, normalize_embeddings=True), want,
                              atol=1e-3)
    info = json.loads((exported / "export.json").read_text())
    (key, meta), = info["indexes"].items()
    np.testing.assert_array_equal(np.load(exported / "index" / key / "vectors.npy"), run.prior.passage_index().vectors)
    assert meta["kb"] == run.ctx.kb.fingerprint == info["kb"]["fingerprint"]


def test_the_model_card_says_what_how_and_how_well(lora_run, exported):
    card = (exported / "README.md").read_text()
    invocation = json.loads((lora_run / "run.json").read_text())["invocations"][0]["command"]
    assert invocation.startswith("jsarag train --config ") and invocation in card
    assert "AutoModelForCausalLM.from_pretrained(\"generator\")" in card and "SentenceTransformer(\"prior\")" in card
    assert "| 4 | dev |" in card and "| 0 | dev |" in card  # every evaluation
    assert "estimator:\n  name: jsa" in card and "LoRA merged into the base" in card
    assert yaml.safe_load((exported / "recipe.yaml").read_text())["generator"]["model"] == "generator"


def test_an_adapter_export_loads_with_peft_and_gives_the_runs_log_likelihoods(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    run_cli("export", str(lora_run), str(out), "--adapter", "--checkpoint", "2")
    assert (out / "generator" / "adapter_model.safetensors").exists()
    assert not (out / "generator" / "model.safetensors").exists()
    run = reference_run(lora_run, "step-0000002")
    pairs, expected = run_token_logprobs(run, dev_batch(run, 2))
    config = json.loads((out / "generator" / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                      out / "generator").eval()
    for (prompt, answer), want in zip(pairs, expected):
        torch.testing.assert_close(hf_token_logprobs(model, prompt, answer), want, rtol=0, atol=1e-5)


def test_export_refuses_what_it_cannot_do(lora_run, exported, tmp_path):
    done = run_cli("export", str(lora_run), str(exported), check=False)
    assert done.returncode == 2 and f"jsarag: error: {exported} exists: export writes a new folder" in done.stderr
    done = run_cli("export", str(tmp_path), str(tmp_path / "out"), check=False)
    assert done.returncode == 2 and f"jsarag: error: {tmp_path}: no run.json and recipe.yaml" in done.stderr
    assert not (tmp_path / "out").exists()


# -- jsarag ask, jsarag index search --------------------------------------------------------------------------------

def dev_questions(run_dir: Path, path: Path) -> list[dict]:
    """The run's final predictions, and a questions file of the same dev examples (with their dialog context)."""
    predictions = [json.loads(line) for line in (run_dir / "predictions" / "dev-step0000004.jsonl").open()]
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    examples = {e["id"]: e for e in map(json.loads, (Path(recipe["data"]["dir"]) / "dev.jsonl").open())}
    path.write_text("".join(json.dumps({"id": p["id"], "question": examples[p["id"]]["question"],
                                        "context": examples[p["id"]]["context"]}) + "\n" for p in predictions))
    return predictions


@pytest.mark.parametrize("source", ["run folder", "export"])
def test_ask_answers_as_the_runs_evaluation_did(lora_run, exported, tmp_path, source):
    predictions = dev_questions(lora_run, tmp_path / "questions.jsonl")
    folder = lora_run if source == "run folder" else exported
    done = run_cli("ask", str(folder), "--questions", str(tmp_path / "questions.jsonl"), "-k", "10", "--out",
                   str(tmp_path / "answers.jsonl"))
    assert "answering with the " in done.stderr and "step 4" in done.stderr
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").open()]
    assert [a["id"] for a in answers] == [p["id"] for p in predictions]
    assert [a["answer"] for a in answers] == [p["prediction"] for p in predictions]
    assert [[q["id"] for q in a["passages"]] for a in answers] == [p["ranked"] for p in predictions]
    first = answers[0]["passages"]
    assert [q["rank"] for q in first] == list(range(1, 11)) and first[0]["score"] >= first[-1]["score"]
    assert abs(sum(q["prob"] for q in first) - 1) < 1e-4  # the prior over its top eval.top_k (10) passages


def test_ask_one_question_and_index_search_use_the_trained_encoder(lora_run, tiny_data, tmp_path):
    asked = run_cli("ask", str(lora_run), "-q", "how do I keep mint fresh?", "-k", "3")
    lines = asked.stdout.strip().splitlines()  # the answer alone: what DeepSpeed prints as it starts goes to stderr
    assert lines[0] == "question: how do I keep mint fresh?" and lines[-1].startswith("answer: ") and len(lines) == 5
    ranked = [line.split("[")[1].split("]")[0] for line in lines[1:-1]]
    searched = run_cli("index", "search", "--config", str(lora_run / "recipe.yaml"), "-q", "how do I keep mint fresh?",
                       "-k", "3")
    assert f"retriever: the trained query encoder of step 4 ({lora_run / 'checkpoints' / 'step-0000004'})" \
        in searched.stdout
    assert [line.split("[")[1].split("]")[0] for line in searched.stdout.splitlines() if "] " in line] == ranked
    untrained = run_cli("index", "search", "--config", str(lora_run / "recipe.yaml"), f"output_dir={tmp_path}", "-q",
                        "how do I keep mint fresh?", "-k", "3")
    assert f"retriever: as built (no checkpoint in {tmp_path / 'checkpoints'})" in untrained.stdout


def test_ask_names_a_bad_questions_line(lora_run, tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question": "fine"}\n{"question": ""}\n')
    done = run_cli("ask", str(lora_run), "--questions", str(tmp_path / "q.jsonl"), check=False)
    assert done.returncode == 2 and f'{tmp_path / "q.jsonl"}:2: needs a non-empty "question" string' in done.stderr


def test_eval_builds_no_optimizer_and_loads_into_zero3_partitions(lora_run):
    """In this process, last: a ZeRO-3 engine leaves DeepSpeed state behind."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    from jsarag.evaluate import evaluate
    from jsarag.loop import load_weights
    from jsarag.recipe import load_recipe
    from jsarag.run import build_run

    final = json.loads((lora_run / "metrics.json").read_text())["final"]
    for config in ("zero0.json", "zero3.json"):
        recipe = load_recipe(lora_run / "recipe.yaml", ["observers=[]", f"deepspeed.config={config}"])
        run = build_run(recipe, train=False, engine=False)
        step, folder = load_weights(run, "step-4", engine=True)
        assert step == 4 and folder == lora_run / "checkpoints" / "step-0000004"
        if config == "zero0.json":
            assert run.engine is None  # nothing to partition, nothing to optimize
        else:  # partitioned for inference: DeepSpeed's ZeRO-Offload, no optimizer, no schedule
            assert type(run.engine.optimizer) is DeepSpeedZeRoOffload and run.engine.lr_scheduler is None
            assert all(hasattr(p, "ds_id") for p in run.engine.module.parameters())  # ZeRO-3 holds them all
        assert {"dev": evaluate(run, "dev").metrics} == final, config


# -- from a 2-rank ZeRO-3 run ---------------------------------------------------------------------------------------

@pytest.mark.launcher
def test_a_two_rank_zero3_run_evaluates_exports_and_answers_in_one_process(tiny_data, tmp_path):
    sections = {**LORA_JSA, "train": {**LORA_JSA["train"], "eval_every": 0}, "eval": {"max_examples": 6},
                "deepspeed": {"config": "zero3.json",
                              "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}}
    recipe = write_recipe(tiny_data, tmp_path, sections)
    run_cli("train", "--config", str(recipe), launcher_ranks=2)
    run_dir = tmp_path / "run"
    shards = sorted((run_dir / "checkpoints" / "step-0000004").glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    assert len(shards) == 2 and not load_pt(shards[0])["frozen_param_fragments"]  # the frozen base is left out
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    predictions = dev_questions(run_dir, tmp_path / "questions.jsonl")  # the training's, before eval rewrites them

    run_cli("eval", "--config", str(run_dir / "recipe.yaml"), launcher_ranks=2)  # ZeRO-3, no optimizer
    assert json.loads((run_dir / "eval" / "step-0000004.json").read_text())["metrics"] == final

    run_cli("export", str(run_dir), str(tmp_path / "out"))  # one process: zero_to_fp32 consolidates the partitions
    run_cli("ask", str(tmp_path / "out"), "--questions", str(tmp_path / "questions.jsonl"), "-k", "10", "--out",
            str(tmp_path / "answers.jsonl"))
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").open()]
    assert [[q["id"] for q in a["passages"]] for a in answers] == [p["ranked"] for p in predictions]
    assert [a["answer"] for a in answers] == [p["prediction"] for p in predictions]
