"""Tests of ``jsarag data convert``: FlashRAG, DPR/Atlas and KILT files into the data layout, which the project's
loaders (load_kb, load_examples) then read as they are."""
from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from jsarag.data import Example, load_examples, split_path
from jsarag.errors import DataError, RecipeError
from jsarag.kb import KnowledgeBase, load_kb
from jsarag.tools.convert import convert, parse_inputs


@pytest.fixture(autouse=True)
def kb_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A KB cache of the test's own."""
    monkeypatch.setenv("JSARAG_KB_CACHE", str(tmp_path / "kb-cache"))
    return tmp_path / "kb-cache"


def jsonl(path: Path, rows: list[Any]) -> Path:
    """Write rows as JSON lines (gzip-compressed for a .gz name)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def loaded(out: Path, *splits: str) -> tuple[KnowledgeBase, dict[str, list[Example]]]:
    """The converted folder read with the project's loaders, every gold id checked against the KB."""
    kb = load_kb(split_path(out, "passages"))
    return kb, {name: list(load_examples(split_path(out, name), kb)) for name in splits}


# ---------------------------------------------------------------------------------------------------------------------
# FlashRAG


def test_flashrag(tmp_path: Path) -> None:
    corpus = jsonl(tmp_path / "wiki.jsonl.gz", [
        {"id": "0", "contents": '"Bread"\nKnead the dough ten minutes.'},
        {"id": 1, "contents": "Salt\nSalt draws water out."},
        {"id": "2", "contents": "No title line at all."},
    ])
    train = jsonl(tmp_path / "nq_train.jsonl", [
        {"id": "train_0", "question": "How long to knead?", "golden_answers": ["ten minutes", "10 min", "ten minutes"],
         "metadata": {}},
        {"id": "train_1", "question": "Unanswered?", "golden_answers": []},
    ])
    dev = jsonl(tmp_path / "dev.jsonl", [{"id": "dev_0", "question": "What draws water?", "golden_answers": ["salt"]}])
    summary = convert("flashrag", [corpus], {"train": train, "dev": dev}, tmp_path / "out")
    kb, examples = loaded(tmp_path / "out", "train", "dev")
    assert [(p.id, p.title, p.text) for p in map(kb.passage, range(3))] == [
        ("0", "Bread", "Knead the dough ten minutes."), ("1", "Salt", "Salt draws water out."),
        ("2", "", "No title line at all.")]
    assert examples["train"] == [Example("train_0", (), "How long to knead?", "ten minutes",
                                         ("ten minutes", "10 min"), ())]
    assert examples["dev"][0].answers == ("salt",)
    assert (summary.passages, summary.examples) == (3, {"train": 1, "dev": 1})
    assert summary.no_answer == {"train": 1, "dev": 0}


# ---------------------------------------------------------------------------------------------------------------------
# DPR and Atlas


def test_dpr_biencoder_json_and_tsv_corpus(tmp_path: Path) -> None:
    tsv = tmp_path / "psgs_w100.tsv"
    with tsv.open("w", newline="") as out:
        rows = csv.writer(out, delimiter="\t")
        rows.writerow(["id", "text", "title"])
        rows.writerow(["1", "Aaron is a prophet.", "Aaron"])
        rows.writerow(["2", 'A "quoted" text\twith a tab.', "Quotes"])
    train = tmp_path / "biencoder-nq-train.json"
    train.write_text(json.dumps([
        {"dataset": "nq", "question": "who is aaron?", "answers": ["a prophet"],
         "positive_ctxs": [{"title": "Aaron", "text": "Aaron is a prophet.", "score": 1, "passage_id": "1"}],
         "negative_ctxs": [{"title": "Moses", "text": "Moses led.", "passage_id": "9"}],
         "hard_negative_ctxs": [{"title": "Quotes", "text": 'A "quoted" text\twith a tab.', "passage_id": "2"}]},
    ]))
    summary = convert("dpr", [tsv], {"train": train}, tmp_path / "out")
    kb, examples = loaded(tmp_path / "out", "train")
    assert list(kb.ids) == ["1", "2", "9"] and kb.render(1) == 'Quotes: A "quoted" text\twith a tab.'
    assert examples["train"] == [Example("train-0", (), "who is aaron?", "a prophet", ("a prophet",), ("1",))]
    assert (summary.passages, summary.from_examples) == (3, 1)


def test_atlas_jsonl_with_retrieved_ctxs(tmp_path: Path) -> None:
    corpus = jsonl(tmp_path / "passages.jsonl", [{"id": "p0", "title": "Nile", "text": "The Nile is long.",
                                                 "section": ""}])
    dev = jsonl(tmp_path / "nq-dev.jsonl", [
        {"question": "longest river?", "answers": ["the Nile", "Nile"],
         "ctxs": [{"id": "p0", "title": "Nile", "text": "The Nile is long.", "has_answer": True},
                  {"title": "Amazon", "text": "The Amazon is wide.", "has_answer": False}]},  # no id: hashed
        {"question": "no answers?", "answers": []},
    ])
    summary = convert("dpr", [corpus], {"dev": dev}, tmp_path / "out")
    kb, examples = loaded(tmp_path / "out", "dev")
    assert len(kb) == 2 and kb.ids[1].startswith("h") and kb.render(1) == "Amazon: The Amazon is wide."
    assert examples["dev"][0].gold_passage_ids == ("p0",) and examples["dev"][0].answers == ("the Nile", "Nile")
    assert summary.no_answer == {"dev": 1}


# ---------------------------------------------------------------------------------------------------------------------
# KILT

KILT_SOURCE = [
    {"_id": "1", "wikipedia_id": "100", "wikipedia_title": "Email marketing",
     "text": ["Email marketing\n", "Email marketing is the act of sending.\n", "Section::::History.\n", "It began.\n"]},
    {"_id": "2", "wikipedia_id": 200, "wikipedia_title": "Spam", "text": ["Spam\n", "Spam is unwanted mail.\n"]},
]
KILT_TASK = [
    {"id": "q1", "input": "what is email marketing?",
     "output": [{"answer": "the act of sending", "provenance": [{"wikipedia_id": "100", "title": "Email marketing",
                                                                 "start_paragraph_id": 1, "end_paragraph_id": 1}]},
                {"answer": "sending email"},
                {"provenance": [{"wikipedia_id": "999", "start_paragraph_id": 2, "end_paragraph_id": 3}]}]},
    {"id": "q2", "input": "what is spam?", "output": [{"answer": "unwanted mail", "provenance": [
        {"wikipedia_id": "200", "start_paragraph_id": 1, "end_paragraph_id": 1}]}]},
    {"id": "q3", "input": "test input without output"},
]


def test_kilt_paragraphs(tmp_path: Path) -> None:
    source = jsonl(tmp_path / "kilt_knowledgesource.json", KILT_SOURCE)
    task = jsonl(tmp_path / "nq-dev-kilt.jsonl", KILT_TASK)
    summary = convert("kilt", [source], {"dev": task}, tmp_path / "out")
    kb, examples = loaded(tmp_path / "out", "dev")
    assert list(kb.ids) == ["100_1", "100_2", "100_3", "200_1"]  # paragraph 0 repeats the title
    assert kb.render(0) == "Email marketing: Email marketing is the act of sending."
    first, second = examples["dev"]
    assert (first.id, first.answer, first.answers, first.gold_passage_ids) == (
        "q1", "the act of sending", ("the act of sending", "sending email"), ("100_1",))
    assert second.gold_passage_ids == ("200_1",)
    assert (summary.missing_gold, summary.no_answer) == (2, {"dev": 1})  # page 999 is not in the source


def test_kilt_pages(tmp_path: Path) -> None:
    source = jsonl(tmp_path / "ks.jsonl", KILT_SOURCE)
    task = jsonl(tmp_path / "dev.jsonl", KILT_TASK)
    convert("kilt", [source], {"dev": task}, tmp_path / "out", kilt_passages="page")
    kb, examples = loaded(tmp_path / "out", "dev")
    assert list(kb.ids) == ["100", "200"] and kb.texts[1] == "Spam is unwanted mail."
    assert kb.texts[0] == "Email marketing is the act of sending. Section::::History. It began."
    assert [ex.gold_passage_ids for ex in examples["dev"]] == [("100",), ("200",)]


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs, atomic output, the command


def test_bad_line_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    corpus = jsonl(tmp_path / "wiki.jsonl", [{"id": "0", "contents": "a\nb"}])
    train = jsonl(tmp_path / "train.jsonl", [{"id": "t0", "question": "q?", "golden_answers": ["a"]},
                                              {"id": "t1", "golden_answers": ["a"]}])
    with pytest.raises(DataError, match='train.jsonl line 2: missing field "question"'):
        convert("flashrag", [corpus], {"train": train}, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl", "wiki.jsonl"]  # no OUT, no leftover
    duplicate = jsonl(tmp_path / "dup.jsonl", [{"id": "0", "contents": "a\nb"}, {"id": 0, "contents": "c\nd"}])
    with pytest.raises(DataError, match='dup.jsonl line 2: duplicate passage id "0"'):
        convert("flashrag", [duplicate], {"train": corpus}, tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="out: exists already"):
        convert("flashrag", [corpus], {"train": train}, tmp_path / "out")


def test_parse_inputs() -> None:
    assert parse_inputs(["passages=a.tsv", "passages=b.jsonl", "train=x/nq.json", "y/dev.jsonl.gz"]) == (
        [Path("a.tsv"), Path("b.jsonl")], {"train": Path("x/nq.json"), "dev": Path("y/dev.jsonl.gz")})
    with pytest.raises(RecipeError, match="split 'dev' is given twice"):
        parse_inputs(["dev=a", "dev=b"])
    with pytest.raises(RecipeError, match="no split given"):
        parse_inputs(["passages=a"])
    with pytest.raises(RecipeError, match="'../x' is not a split name"):
        parse_inputs(["../x=a"])


def test_command_line(tmp_path: Path) -> None:
    jsonl(tmp_path / "ks.jsonl", KILT_SOURCE)
    jsonl(tmp_path / "dev.jsonl", KILT_TASK)
    out = tmp_path / "kilt"
    done = run_cli("data", "convert", "kilt", f"passages={tmp_path / 'ks.jsonl'}", str(tmp_path / "dev.jsonl"),
                   str(out))
    assert f"wrote {out}: 4 passages; examples: dev 2 (1 without an answer left out)" in done.stdout
    assert sorted(os.listdir(out)) == ["dev.jsonl", "passages.jsonl"]
    failed = run_cli("data", "convert", "kilt", str(tmp_path / "dev.jsonl"), str(out), check=False)
    assert failed.returncode == 2 and "kilt: exists already" in failed.stderr


def test_killed_conversion_leaves_no_folder(tmp_path: Path) -> None:
    jsonl(tmp_path / "ks.jsonl", KILT_SOURCE)
    jsonl(tmp_path / "dev.jsonl", KILT_TASK)
    kill_before_rename = (  # a real SIGKILL with every file written, before the rename
        "import os, signal, sys; from pathlib import Path; from jsarag.tools.convert import convert\n"
        "os.rename = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "convert('kilt', [Path(sys.argv[1])], {'dev': Path(sys.argv[2])}, Path(sys.argv[3]))\n")
    done = subprocess.run([sys.executable, "-c", kill_before_rename, str(tmp_path / "ks.jsonl"),
                           str(tmp_path / "dev.jsonl"), str(tmp_path / "out")], capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert not (tmp_path / "out").exists()
    leftover = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(leftover) == 1 and (tmp_path / leftover[0] / "dev.jsonl").is_file()  # complete, but never OUT
