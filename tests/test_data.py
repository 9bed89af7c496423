"""Tests of jsarag.data and jsarag.kb: the embedded DoQA set, SQuAD, input checking, fingerprints, rendering."""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import child_env
from jsarag.data import (
    UNANSWERABLE,
    Example,
    Source,
    default_data_dir,
    load_examples,
    render_history,
    render_posterior_query,
    render_query,
    split_path,
)
from jsarag.errors import DataError, RecipeError
from jsarag.kb import BATCH_ROWS, CACHE_ENV, KnowledgeBase, Passage, kb_cache_dir, load_kb
from jsarag.recipe import DataConfig, load_recipe

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DOQA_FILES = ["passages", "train", "dev", "test"]
# sha256 of the embedded DoQA cooking passages as KnowledgeBase.fingerprint computes it: a change means every cached
# index of it is invalidated, so it must be deliberate
# (the mojibake repair of jsarag/datasets/doqa_cooking/README.md changed it from 4a3fa312cbf51733...)
DOQA_FINGERPRINT = "6ef1dc71834c1c2cee6f1da72daea9f67f5d31575691e9b710369f47f03c9b6c"
DOQA_REPAIRED = 304  # strings the mojibake repair changed, all files together
# UTF-8 read as Latin-1 or cp1252: a lead byte's character then continuation bytes' ("Â°" for "°", "Ã©" for "é",
# "Ï\x80" for "π", "â€™" or "â\x80\x99" for "’"); cp1252 shows bytes 0x80-0x9f as these characters
CONTINUATION = "\u0080-\u00bf€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ"
MOJIBAKE = re.compile(f"[\u00c2-\u00df][{CONTINUATION}]|[\u00e0-\u00ef][{CONTINUATION}]{{2}}")

PASSAGES = [
    {"id": "p0", "title": "", "text": "Duck legs are tough; confit them."},
    {"id": "p1", "title": "Bread", "text": "Knead the dough ten minutes."},
    {"id": "p2", "title": "", "text": "Salt draws water out of aubergines."},
]


def example(**overrides: Any) -> dict[str, Any]:
    """A valid example line as a dict, with some fields replaced."""
    fields = {"id": "e0", "context": [], "question": "How long to knead?", "answer": "ten minutes",
              "answers": ["ten minutes"], "gold_passage_ids": ["p1"]}
    return {**fields, **overrides}


def without(key: str, **overrides: Any) -> dict[str, Any]:
    """A valid example line as a dict, less one field."""
    return {k: v for k, v in example(**overrides).items() if k != key}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Write one line per item: a str as it is, anything else as JSON."""
    text = "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


@pytest.fixture
def kb(tmp_path: Path) -> KnowledgeBase:
    """A three-passage knowledge base."""
    return load_kb(write_jsonl(tmp_path / "passages.jsonl", PASSAGES))


# ---------------------------------------------------------------------------------------------------------------------
# The embedded dataset and the shared data folders


def test_embedded_doqa_counts() -> None:
    data_dir = default_data_dir()
    kb = load_kb(split_path(data_dir, "passages"))
    assert len(kb) == 1108
    counts = {split: len(load_examples(split_path(data_dir, split), kb)) for split in ["train", "dev", "test"]}
    assert counts == {"train": 4608, "dev": 910, "test": 1792}
    answerable = load_examples(split_path(data_dir, "train"), kb, drop_unanswerable=True)
    assert len(answerable) == 4608 - 1271
    assert answerable.dropped_unanswerable == 1271 and answerable.skipped == 0
    assert all(ex.answer != UNANSWERABLE for ex in answerable)
    assert load_examples(split_path(data_dir, "test"), kb, drop_unanswerable=True).dropped_unanswerable == 534


def test_embedded_doqa_is_packaged_with_licence() -> None:
    data_dir = default_data_dir()
    assert sorted(p.name for p in data_dir.glob("*.jsonl.gz")) == sorted(f"{name}.jsonl.gz" for name in DOQA_FILES)
    assert "https://creativecommons.org/licenses/by-sa/4.0/" in (data_dir / "LICENSE").read_text()
    readme = (data_dir / "README.md").read_text()
    assert "Campos" in readme and "c1ff7e51" in readme and UNANSWERABLE in readme


def test_embedded_doqa_fingerprint_is_pinned() -> None:
    kb = load_kb(split_path(default_data_dir(), "passages"))
    assert kb.fingerprint == DOQA_FINGERPRINT


def strings(value: Any) -> list[str]:
    """Every string in a parsed JSON value, in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    return []


def doqa_lines(folder: Path, name: str) -> list[dict]:
    """The parsed lines of a DoQA file, embedded (.jsonl.gz) or shared (.jsonl)."""
    packed = folder / f"{name}.jsonl.gz"
    raw = gzip.decompress(packed.read_bytes()) if packed.is_file() else (folder / f"{name}.jsonl").read_bytes()
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def test_embedded_doqa_has_no_mojibake_and_answers_stay_in_their_passages() -> None:
    found = [s for name in DOQA_FILES for line in doqa_lines(default_data_dir(), name) for s in strings(line)
             if MOJIBAKE.search(s)]
    assert found == []
    kb = load_kb(split_path(default_data_dir(), "passages"))
    answerable = [ex for split in ["train", "dev", "test"]
                  for ex in load_examples(split_path(default_data_dir(), split), kb) if ex.answer != UNANSWERABLE]
    assert len(answerable) == (4608 - 1271) + (910 - 249) + (1792 - 534)
    assert all(ex.answer in kb.texts[kb.row(pid)] for ex in answerable for pid in ex.gold_passage_ids)
    assert all(ex.gold_passage_ids for ex in answerable)


@pytest.mark.skipif(not (SHARED_DATA / "doqa_cooking").is_dir(), reason="shared/data/doqa_cooking is absent")
def test_embedded_doqa_differs_from_shared_only_by_repaired_mojibake() -> None:
    repaired = 0
    for name in DOQA_FILES:
        embedded, shared = doqa_lines(default_data_dir(), name), doqa_lines(SHARED_DATA / "doqa_cooking", name)
        assert [line["id"] for line in embedded] == [line["id"] for line in shared]
        for ours, theirs in zip(embedded, shared):
            assert list(ours) == list(theirs) and len(strings(ours)) == len(strings(theirs))
            for fixed, original in zip(strings(ours), strings(theirs)):
                if fixed != original:
                    assert MOJIBAKE.search(original) and not MOJIBAKE.search(fixed), (original, fixed)
                    repaired += 1
    assert repaired == DOQA_REPAIRED  # as the dataset's README says


@pytest.mark.skipif(not (SHARED_DATA / "squad_v1.1").is_dir(), reason="shared/data/squad_v1.1 is absent")
def test_squad_loads() -> None:
    data_dir = SHARED_DATA / "squad_v1.1"
    kb = load_kb(split_path(data_dir, "passages"))
    assert len(kb) == 4497
    assert kb.render(0).startswith("University of Notre Dame: ")
    train, dev = (load_examples(split_path(data_dir, split), kb) for split in ["train", "dev"])
    assert (len(train), len(dev)) == (11877, 4961)
    assert all(ex.context == () for ex in train)
    with pytest.raises(DataError, match="no split \"test\".*present: dev, passages, train"):
        split_path(data_dir, "test")


# ---------------------------------------------------------------------------------------------------------------------
# Bad example files: each error names the file and the line


BAD_EXAMPLES = {
    "not JSON": ('{"id": "e1", "question": ', "not valid JSON (Expecting value"),
    "not an object": ("[1, 2]", "expected a JSON object, got a list"),
    "missing field": (without("question", id="e1"), 'missing field "question"'),
    "id not a string": (example(id=7), 'field "id" must be a string, got a number'),
    "context not a list": (example(id="e1", context="earlier turn"), 'field "context" must be a list of strings'),
    "context item not a string": (example(id="e1", context=["hi", None]), 'field "context" must be a list of strings'),
    "answers empty": (example(id="e1", answers=[]), 'field "answers" is an empty list'),
    "answers not strings": (example(id="e1", answers=[1]), 'field "answers" must be a list of strings'),
    "question empty": (example(id="e1", question="  "), 'field "question" is empty'),
    "answer empty": (example(id="e1", answer=""), 'field "answer" is empty'),
    "answer null": (example(id="e1", answer=None), 'field "answer" must be a string, got null'),
    "gold ids missing": (without("gold_passage_ids", id="e1"), 'missing field "gold_passage_ids"'),
    "duplicate id": (example(), 'duplicate example id "e0" (first at line 1)'),
    "gold id not in KB": (example(id="e1", gold_passage_ids=["p9"]), 'gold passage id "p9" is not in the knowledge'),
    "nested too deeply": ('{"id": "e1", "context": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply"),
    "lone surrogate": (json.dumps(example(id="e1", question="q?")).replace("q?", "q\\ud800"),
                       'field "question" holds a lone surrogate'),
    "integer too long": ('{"id": ' + "1" * 5000 + "}", "not valid JSON (Exceeds the limit"),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("case", sorted(BAD_EXAMPLES))
def test_bad_example_line_is_named(tmp_path: Path, kb: KnowledgeBase, case: str, suffix: str) -> None:
    bad, message = BAD_EXAMPLES[case]
    path = write_jsonl(tmp_path / f"train{suffix}", [example(), "", bad, example(id="e2")])  # bad line is line 3
    with pytest.raises(DataError) as caught:
        load_examples(path, kb)
    assert f"train{suffix} line 3: " in str(caught.value)
    assert message in str(caught.value)


def test_gold_ids_are_not_checked_without_kb(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "dev.jsonl", [example(gold_passage_ids=["p9"])])
    assert load_examples(path, None)[0].gold_passage_ids == ("p9",)


def test_missing_answers_default_to_answer(tmp_path: Path, kb: KnowledgeBase) -> None:
    path = write_jsonl(tmp_path / "dev.jsonl", [without("answers")])
    assert load_examples(path, kb)[0].answers == ("ten minutes",)


def test_example_fields(tmp_path: Path, kb: KnowledgeBase) -> None:
    line = example(context=["Hi?", "Hello."], answers=["ten minutes", "10 min"], extra="ignored")
    loaded = load_examples(write_jsonl(tmp_path / "dev.jsonl", [line]), kb)
    assert loaded.path == tmp_path / "dev.jsonl"
    assert list(loaded) == [Example("e0", ("Hi?", "Hello."), "How long to knead?", "ten minutes",
                                    ("ten minutes", "10 min"), ("p1",))]


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_empty_example_file_is_an_error(tmp_path: Path, kb: KnowledgeBase, lines: list[str]) -> None:
    with pytest.raises(DataError, match="dev.jsonl: no examples"):
        load_examples(write_jsonl(tmp_path / "dev.jsonl", lines), kb)


def test_skip_counts_bad_lines_and_logs_once(tmp_path: Path, kb: KnowledgeBase,
                                             caplog: pytest.LogCaptureFixture) -> None:
    lines = [example(id=f"e{i}") for i in range(8)]
    lines[1], lines[4], lines[6] = "not json", example(id="e4", answer=""), example(id="e0")  # e0 again: duplicate
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="jsarag.data"):
        loaded = load_examples(path, kb, on_error="skip")
    assert (len(loaded), loaded.skipped) == (5, 3)
    assert [ex.id for ex in loaded] == ["e0", "e2", "e3", "e5", "e7"]
    assert len(caplog.records) == 1
    assert "skipped 3 bad lines (lines 2, 5, 7)" in caplog.text and "train.jsonl" in caplog.text


def test_skip_counts_lines_no_parser_could_take(tmp_path: Path, kb: KnowledgeBase) -> None:
    deep = '{"id": "e1", "context": ' + "[" * 100_000 + "]" * 100_000 + "}"
    surrogate = json.dumps(example(id="e2", question="q?")).replace("q?", "q\\ud800")
    loaded = load_examples(write_jsonl(tmp_path / "train.jsonl", [example(), deep, surrogate]), kb, on_error="skip")
    assert (len(loaded), loaded.skipped) == (1, 2)


def test_skip_with_no_good_line_is_an_error(tmp_path: Path, kb: KnowledgeBase) -> None:
    with pytest.raises(DataError, match=r"no examples \(2 bad lines skipped\)"):
        load_examples(write_jsonl(tmp_path / "train.jsonl", ["{", "[]"]), kb, on_error="skip")


def test_drop_unanswerable(tmp_path: Path, kb: KnowledgeBase) -> None:
    lines = [example(), example(id="e1", answer=UNANSWERABLE, answers=[UNANSWERABLE]), example(id="e2")]
    path = write_jsonl(tmp_path / "dev.jsonl", lines)
    assert len(load_examples(path, kb)) == 3
    kept = load_examples(path, kb, drop_unanswerable=True)
    assert ([ex.id for ex in kept], kept.dropped_unanswerable) == (["e0", "e2"], 1)


# ---------------------------------------------------------------------------------------------------------------------
# Bad passage files


BAD_PASSAGES = {
    "not JSON": ('{"id": "p7" "title": ""}', "not valid JSON (Expecting ',' delimiter"),
    "not an object": ('"just text"', "expected a JSON object, got a string"),
    "missing text": ({"id": "p7", "title": ""}, 'missing field "text"'),
    "missing title": ({"id": "p7", "text": "t"}, 'missing field "title"'),
    "id not a string": ({"id": 7, "title": "", "text": "t"}, 'field "id" must be a string, got a number'),
    "empty id": ({"id": "", "title": "", "text": "t"}, 'field "id" is empty'),
    "text not a string": ({"id": "p7", "title": "", "text": ["t"]}, 'field "text" must be a string, got a list'),
    "duplicate id": ({"id": "p1", "title": "", "text": "again"}, 'duplicate passage id "p1" (first at line 2)'),
    "nested too deeply": ('{"id": "p7", "title": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply"),
    "lone surrogate in the id": ('{"id": "p\\ud800", "title": "", "text": "t"}', 'field "id" holds a lone surrogate'),
    "lone surrogate in the text": ('{"id": "p7", "title": "", "text": "t\\udfff"}',
                                   'field "text" holds a lone surrogate'),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("case", sorted(BAD_PASSAGES))
def test_bad_passage_line_is_named(tmp_path: Path, case: str, suffix: str) -> None:
    bad, message = BAD_PASSAGES[case]
    path = write_jsonl(tmp_path / f"passages{suffix}", [*PASSAGES, "", bad])  # bad line is line 5
    with pytest.raises(DataError) as caught:
        load_kb(path)
    assert f"passages{suffix} line 5: {message}" in str(caught.value)


@pytest.mark.parametrize("lines", [[], ["", " "]])
def test_empty_passage_file_is_an_error(tmp_path: Path, lines: list[str]) -> None:
    with pytest.raises(DataError, match="passages.jsonl: no passages"):
        load_kb(write_jsonl(tmp_path / "passages.jsonl", lines))


def test_unreadable_files_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="passages.jsonl: no such file"):
        load_kb(tmp_path / "passages.jsonl")
    (tmp_path / "passages.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="passages.jsonl.gz: cannot be read"):
        load_kb(tmp_path / "passages.jsonl.gz")
    (tmp_path / "bad_utf8.jsonl").write_bytes(b'{"id": "p0", "title": "", "text": "\xff"}\n')
    with pytest.raises(DataError, match="bad_utf8.jsonl line 1: not valid JSON"):
        load_kb(tmp_path / "bad_utf8.jsonl")
    with pytest.raises(DataError, match=r"x+\.\.\.: not a usable path \(File name too long\)$"):
        load_kb(Path("x" * 300))
    with pytest.raises(DataError, match="not a usable path"):
        split_path(tmp_path / ("x" * 300), "train")


# ---------------------------------------------------------------------------------------------------------------------
# The knowledge base


def test_kb_lookup_and_render(kb: KnowledgeBase) -> None:
    assert list(kb.ids) == ["p0", "p1", "p2"] and len(kb) == 3 and len(kb.texts) == 3
    assert (kb.row("p2"), kb.has("p1"), kb.has("p9"), kb.id(1)) == (2, True, False, "p1")
    assert ("p1" in kb.ids, "p9" in kb.ids) == (True, False)
    assert kb.render(0) == "Duck legs are tough; confit them."
    assert kb.render(1) == "Bread: Knead the dough ten minutes."
    assert kb.render_many([1, 0, 1]) == [kb.render(1), kb.render(0), kb.render(1)]
    assert kb.passage(1) == Passage("p1", "Bread", "Knead the dough ten minutes.")
    assert kb.passage(2) == Passage(**PASSAGES[2])
    assert (kb.titles[-2], kb.texts[1:], kb.ids[::2]) == ("Bread", [p["text"] for p in PASSAGES[1:]], ["p0", "p2"])
    with pytest.raises(IndexError):
        kb.texts[3]
    with pytest.raises(IndexError):
        kb.render_many([0, 3])
    with pytest.raises(DataError, match=r'passage id "p9" is not in the knowledge base .*passages.jsonl'):
        kb.row("p9")


def test_kb_fingerprint(tmp_path: Path, kb: KnowledgeBase) -> None:
    same = load_kb(write_jsonl(tmp_path / "copy.jsonl.gz", PASSAGES))
    assert kb.fingerprint == same.fingerprint and len(kb.fingerprint) == 64
    edited = [dict(p) for p in PASSAGES]
    edited[2]["text"] = edited[2]["text"].replace("water", "Water")
    assert load_kb(write_jsonl(tmp_path / "edited.jsonl", edited)).fingerprint != kb.fingerprint
    shifted = [dict(p) for p in PASSAGES]
    shifted[1].update(title="Brea", text="d" + shifted[1]["text"])  # same characters, other field boundary
    assert load_kb(write_jsonl(tmp_path / "shifted.jsonl", shifted)).fingerprint != kb.fingerprint
    reordered = [PASSAGES[1], PASSAGES[0], PASSAGES[2]]
    assert load_kb(write_jsonl(tmp_path / "reordered.jsonl", reordered)).fingerprint != kb.fingerprint


def test_split_path(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl.gz", [example()])
    assert split_path(tmp_path, "train") == tmp_path / "train.jsonl.gz"
    with pytest.raises(DataError, match=r'no split "dev" \(dev.jsonl\[.gz\]\); present: train'):
        split_path(tmp_path, "dev")
    write_jsonl(tmp_path / "train.jsonl", [example()])
    with pytest.raises(DataError, match="both train.jsonl and train.jsonl.gz exist"):
        split_path(tmp_path, "train")
    with pytest.raises(DataError, match="absent: no such folder"):
        split_path(tmp_path / "absent", "train")


# ---------------------------------------------------------------------------------------------------------------------
# Rendering

DUCK = Example(
    id="d1",
    context=("Tips for grilling duck legs?", "I think grilling is a bad plan"),
    question="What makes you say that?",
    answer="the fat content",
    answers=("the fat content",),
    gold_passage_ids=("p0",),
)
LONG = Example("d2", ("u1", "s1", "u2", "s2", "u3", "s3"), "q4", "a4", ("a4",), ())


def test_render_query() -> None:
    assert render_query(DUCK, 4) == (
        "What makes you say that? || system: I think grilling is a bad plan | user: Tips for grilling duck legs?"
    )
    assert render_query(DUCK, 0) == "What makes you say that?"
    assert render_query(DUCK, 1) == "What makes you say that? || system: I think grilling is a bad plan"
    assert render_query(LONG, 3) == "q4 || system: s3 | user: u3 | system: s2"
    assert render_query(LONG, 100) == "q4 || system: s3 | user: u3 | system: s2 | user: u2 | system: s1 | user: u1"
    no_history = Example("q", (), "Who?", "Me", ("Me",), ())
    assert render_query(no_history, 4) == "Who?"


def test_render_posterior_query() -> None:
    assert render_posterior_query(DUCK, 1, " [SEP] ") == (
        "What makes you say that? || system: I think grilling is a bad plan [SEP] the fat content"
    )
    assert render_posterior_query(DUCK, 0, "\n") == "What makes you say that?\nthe fat content"


def test_render_history() -> None:
    assert render_history(DUCK, 4) == "User: Tips for grilling duck legs?\nAssistant: I think grilling is a bad plan"
    assert render_history(LONG, 3) == "Assistant: s2\nUser: u3\nAssistant: s3"
    assert render_history(DUCK, 0) == ""
    assert render_history(Example("q", (), "Who?", "Me", ("Me",), ()), 4) == ""
    with pytest.raises(ValueError, match="max_history_turns"):
        render_history(DUCK, -1)


# ---------------------------------------------------------------------------------------------------------------------
# The knowledge-base cache: converted once, memory-mapped, keyed by the source file's identity


def stores(cache: Path) -> list[Path]:
    """The converted KB folders in a KB cache (leftovers of killed conversions start with a dot)."""
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture
def kb_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A KB cache of the test's own, through JSARAG_KB_CACHE."""
    cache = tmp_path / "kb-cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return cache


def test_kb_is_converted_once_and_mapped_after(tmp_path: Path, kb_cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "passages.jsonl", PASSAGES)
    first = load_kb(path)
    assert first.store is not None and first.store.parent == kb_cache and stores(kb_cache) == [first.store]
    assert sorted(p.name for p in first.store.iterdir()) == ["meta.json", "passages.arrow", "slots.npy"]

    def no_reading(path: Path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr("jsarag.data.read_lines", no_reading)  # a second load must not touch the text
    again = load_kb(path)
    assert (again.store, again.fingerprint, list(again.texts)) == (first.store, first.fingerprint, list(first.texts))


def test_changed_kb_file_is_converted_again(tmp_path: Path, kb_cache: Path) -> None:
    path = write_jsonl(tmp_path / "passages.jsonl", PASSAGES)
    before = load_kb(path)
    write_jsonl(path, [*PASSAGES, {"id": "p3", "title": "", "text": "Rest the dough."}])
    after = load_kb(path)
    assert (len(before), len(after)) == (3, 4) and after.fingerprint != before.fingerprint
    assert stores(kb_cache) == [after.store]  # the version of the old content is dropped
    os.utime(path, ns=(0, 0))  # same bytes, other modification time: converted again, same fingerprint
    assert load_kb(path).fingerprint == after.fingerprint and stores(kb_cache) != [after.store]


def test_killed_conversion_leaves_nothing_that_is_read(tmp_path: Path, kb_cache: Path) -> None:
    path = write_jsonl(tmp_path / "passages.jsonl", PASSAGES)
    kill_before_rename = (  # a real SIGKILL with every file of the conversion written, before the rename
        "import os, signal, sys; import jsarag.kb as kb\n"
        "os.rename = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        "kb.load_kb(kb.Path(sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-c", kill_before_rename, str(path)], env=child_env(), capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    leftovers = [p for p in kb_cache.iterdir() if p.is_dir()]
    assert stores(kb_cache) == [] and len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-")
    assert (leftovers[0] / "meta.json").is_file()  # complete, yet never read: only the renamed folder is
    kb = load_kb(path)
    assert list(kb.ids) == ["p0", "p1", "p2"]
    assert [p for p in kb_cache.iterdir() if p.is_dir()] == [kb.store]  # the leftover is removed


def test_broken_store_is_converted_again(tmp_path: Path, kb_cache: Path) -> None:
    path = write_jsonl(tmp_path / "passages.jsonl", PASSAGES)
    store = load_kb(path).store
    arrow = store / "passages.arrow"
    arrow.write_bytes(arrow.read_bytes()[:100])  # cut short behind our back
    kb = load_kb(path)
    assert kb.store == store and kb.passage(2) == Passage(**PASSAGES[2])


def test_failed_conversion_leaves_no_folder(tmp_path: Path, kb_cache: Path) -> None:
    path = write_jsonl(tmp_path / "passages.jsonl", [*PASSAGES, {"id": "p3", "title": ""}])
    with pytest.raises(DataError, match='passages.jsonl line 4: missing field "text"'):
        load_kb(path)
    assert [p for p in kb_cache.iterdir() if p.is_dir()] == []


def test_read_only_source_folder_gets_nothing_written(kb_cache: Path) -> None:
    folder = default_data_dir()  # inside the installed package: may be read-only
    before = sorted(p.name for p in folder.iterdir())
    assert len(load_kb(split_path(folder, "passages"))) == 1108
    assert sorted(p.name for p in folder.iterdir()) == before and len(stores(kb_cache)) == 1


def test_kb_cache_defaults_to_the_jsarag_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("JSARAG_CACHE", str(tmp_path / "jsarag"))
    assert kb_cache_dir() == tmp_path / "jsarag" / "kb"
    assert load_kb(write_jsonl(tmp_path / "passages.jsonl", PASSAGES)).store.parent == tmp_path / "jsarag" / "kb"


def test_unwritable_kb_cache_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "kb"))  # under a file: no folder can be made, even by root
    with pytest.raises(DataError, match=f"a-file/kb: cannot write the knowledge-base cache here .*set {CACHE_ENV}"):
        load_kb(write_jsonl(tmp_path / "passages.jsonl", PASSAGES))


def test_lookup_survives_colliding_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jsarag.kb._key", lambda text: 7)  # every id and text the same 64-bit key: one probe chain
    ids = [f"p{i}" for i in range(40)]
    kb = KnowledgeBase.from_lists("kb.jsonl", ids, [""] * 40, [f"text {i % 30}" for i in range(40)])
    assert [kb.row(pid) for pid in ids] == list(range(40))
    assert not kb.has("p40") and kb.duplicate_texts == 10  # verified texts: 10 repeat an earlier one
    with pytest.raises(DataError, match='kb.jsonl row 3: duplicate passage id "p1" \\(first at row 1\\)'):
        KnowledgeBase.from_lists("kb.jsonl", ["p0", "p1", "p2", "p1"], [""] * 4, ["a", "b", "c", "d"])


def test_slot_table_finds_every_id_and_only_those() -> None:
    rng = np.random.default_rng(0)
    ids = [f"id-{n}" for n in rng.choice(10**9, size=20_000, replace=False)]
    kb = KnowledgeBase.from_lists("kb.jsonl", ids, [""] * len(ids), ["t"] * len(ids))
    assert all(kb.row(pid) == row for row, pid in enumerate(ids))
    assert not any(kb.has(f"absent-{i}") for i in range(2000))
    assert kb.duplicate_texts == len(ids) - 1 and len(kb._rows) == 32_768  # a power of two >= 1.5 x 20,000
    assert sorted(kb._rows[kb._rows >= 0].tolist()) == list(range(len(ids)))


def test_duplicate_texts_are_counted_and_warned_once(tmp_path: Path, kb_cache: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    lines = [*PASSAGES, {"id": "p3", "title": "", "text": PASSAGES[0]["text"]},
             {"id": "p4", "title": "Other", "text": PASSAGES[0]["text"]}, {"id": "p5", "title": "", "text": "new"}]
    path = write_jsonl(tmp_path / "passages.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="jsarag.kb"):
        kb = load_kb(path)
        load_kb(path)
    assert kb.duplicate_texts == 2
    assert len(caplog.records) == 1
    assert "2 passages repeat the text" in caplog.text and '"p3" repeats "p0"' in caplog.text
    assert load_kb(write_jsonl(tmp_path / "other.jsonl", PASSAGES)).duplicate_texts == 0


def test_kb_columns_iterate_in_batches(tmp_path: Path, kb_cache: Path) -> None:
    n = BATCH_ROWS + 5  # two record batches
    path = write_jsonl(tmp_path / "passages.jsonl", [{"id": f"p{i}", "title": "", "text": f"t{i}"} for i in range(n)])
    kb = load_kb(path)
    assert len(list(kb.texts)) == n and kb.texts[BATCH_ROWS] == f"t{BATCH_ROWS}" and kb.ids[-1] == f"p{n - 1}"
    assert kb.row(f"p{BATCH_ROWS + 4}") == BATCH_ROWS + 4
    assert datasets.Dataset.from_file(str(kb.store / "passages.arrow"))[n - 1]["text"] == f"t{n - 1}"


# ---------------------------------------------------------------------------------------------------------------------
# Sources other than the layout: anything the datasets library reads, with a field mapping


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A datasets cache of the test's own."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return tmp_path / "hf-datasets"


def test_kb_from_csv_with_a_mapping(tmp_path: Path, kb_cache: Path, hf_cache: Path) -> None:
    csv = tmp_path / "corpus.csv"
    csv.write_text("docid,heading,body\n10,Bread,Knead it.\n11,,Salt it.\n")  # integer ids, an empty title
    kb = load_kb(Source(str(csv), fields={"id": "docid", "title": "heading", "text": "body"}))
    assert list(kb.ids) == ["10", "11"] and kb.render(1) == "Salt it." and kb.render(0) == "Bread: Knead it."
    assert kb.path == csv
    bad = tmp_path / "bad.csv"
    bad.write_text("id,title,text\na,,x\nb,,y\na,,z\n")
    with pytest.raises(DataError, match=r'bad.csv row 2: duplicate passage id "a" \(first at row 0\)'):
        load_kb(Source(str(bad)))
    with pytest.raises(DataError, match=r'corpus.csv: no column "text" for the field "text" \(columns: docid, '
                                        r'heading, body\); map it with fields.text: COLUMN$'):
        load_kb(Source(str(csv), fields={"id": "docid", "title": None}))


def test_examples_from_parquet_with_a_mapping(tmp_path: Path, kb: KnowledgeBase, hf_cache: Path) -> None:
    table = pa.table({"query": ["How long to knead?", "Why salt?"], "refs": [["ten minutes", "10 min"], ["water"]],
                      "meta": [{"docs": ["p1"]}, {"docs": ["p2"]}]})
    pq.write_table(table, tmp_path / "dev.parquet")
    fields = {"id": None, "context": None, "question": "query", "answer": None, "answers": "refs",
              "gold_passage_ids": "meta.docs"}
    loaded = load_examples(Source(str(tmp_path / "dev.parquet"), fields=fields), kb)
    assert list(loaded) == [Example("0", (), "How long to knead?", "ten minutes", ("ten minutes", "10 min"), ("p1",)),
                            Example("1", (), "Why salt?", "water", ("water",), ("p2",))]
    pq.write_table(pa.table({"query": ["ok?", " "], "refs": [["a"], ["b"]], "meta": [{"docs": []}, {"docs": []}]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(DataError, match='bad.parquet row 1: field "query" is empty'):
        load_examples(Source(str(tmp_path / "bad.parquet"), fields=fields), kb)
    skipped = load_examples(Source(str(tmp_path / "bad.parquet"), fields=fields), kb, on_error="skip")
    assert (len(skipped), skipped.skipped) == (1, 1)


def test_jsonl_with_a_mapping_keeps_line_numbers(tmp_path: Path, kb: KnowledgeBase) -> None:
    lines = [{"question": "How long?", "golden_answers": ["ten minutes"]}, "",
             {"question": "", "golden_answers": ["x"]}]
    path = write_jsonl(tmp_path / "flashrag.jsonl", lines)
    fields = {"id": None, "context": None, "answer": None, "answers": "golden_answers", "gold_passage_ids": None}
    with pytest.raises(DataError, match='flashrag.jsonl line 3: field "question" is empty'):
        load_examples(Source(path, fields=fields), kb)
    assert load_examples(Source(path, fields=fields), kb, on_error="skip")[0].answers == ("ten minutes",)


def test_saved_dataset_dicts_pick_a_split(tmp_path: Path, kb: KnowledgeBase, hf_cache: Path) -> None:
    rows = {"id": ["e0"], "context": [[]], "question": ["How long?"], "answer": ["ten minutes"],
            "gold_passage_ids": [["p1"]]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "validation": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "saved")
    assert load_examples(Source(str(tmp_path / "saved"), split="train"), kb)[0].answers == ("ten minutes",)
    assert load_examples(Source(str(tmp_path / "saved"), split="dev"), kb).path == tmp_path / "saved"  # = validation
    with pytest.raises(DataError, match=r'saved: no split "test"; present: train, validation'):
        load_examples(Source(str(tmp_path / "saved"), split="test"), kb)
    with pytest.raises(DataError, match="saved: holds the splits train, validation; choose one with split: NAME"):
        load_examples(Source(str(tmp_path / "saved")), kb)
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "one")
    assert len(load_examples(Source(str(tmp_path / "one")), kb)) == 1
    with pytest.raises(DataError, match=r"saved split train row 0: gold passage id \"p9\""):
        rows["gold_passage_ids"] = [["p9"]]
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "saved")
        load_examples(Source(str(tmp_path / "saved"), split="train"), kb)


def test_unreachable_sources_are_data_errors(tmp_path: Path, kb: KnowledgeBase, monkeypatch, hf_cache) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no-such-org/no-such-set: the datasets library cannot read it .*go online"):
        load_examples(Source("no-such-org/no-such-set", split="train"), kb)
    with pytest.raises(DataError, match="missing/dev.csv: no such file or folder"):
        load_examples(Source(str(tmp_path / "missing" / "dev.csv")), kb)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes.txt: unknown file type; read are .jsonl, .jsonl.gz, .json"):
        load_examples(Source(str(tmp_path / "notes.txt")), kb)
    with pytest.raises(DataError, match="a file holds one split, so split: dev cannot be chosen"):
        load_examples(Source(str(tmp_path / "notes.txt"), split="dev"), kb)


# ---------------------------------------------------------------------------------------------------------------------
# The recipe's data section


def test_data_config_sources(tmp_path: Path) -> None:
    data = DataConfig.model_validate({"dir": str(tmp_path), "passages": "corpus.parquet",
                                      "splits": {"dev": {"path": "dev.csv", "fields": {"answer": None}}},
                                      "fields": {"question": "query"}})
    write_jsonl(tmp_path / "train.jsonl", [example()])
    assert data.kb_source() == Source("corpus.parquet")
    assert data.split_source("dev") == Source("dev.csv", fields={"answer": None})
    assert data.split_source("train") == Source(tmp_path / "train.jsonl", fields={"question": "query"})
    hub = DataConfig.model_validate({"examples": {"path": "org/set", "name": "cfg", "fields": {"context": None}}})
    assert hub.split_source("test") == Source("org/set", "cfg", "test", {"context": None})
    assert DataConfig().kb_source() == default_data_dir() / "passages.jsonl.gz"


@pytest.mark.parametrize(("data", "message"), [
    ({"passages": {"path": "c.csv", "fields": {"body": "text"}}},
     'data.passages: field mapping: "body" is not a field'),
    ({"fields": {"question": None}}, 'data.fields: field mapping: "question" cannot map to null'),
    ({"splits": {"dev": {"path": "d.csv", "fields": {"answer": None, "answers": None}}}},
     'data.splits: field mapping: "answer" and "answers" cannot both map to null'),
    ({"examples": {"path": "org/set", "split": "train"}}, "data.examples: data.examples reads each split from"),
    ({"passages": {"path": "c.csv", "nme": "x"}}, "data.passages.nme: unknown key; did you mean 'data.passages.name'"),
])
def test_bad_data_sections_name_the_key_and_line(tiny_recipe, data: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(message) + r".*\(.*recipe.yaml line \d+\)"):
        load_recipe(tiny_recipe(data=data))


def test_missing_data_dir_says_the_folder_is_missing(tmp_path: Path) -> None:
    data = DataConfig.model_validate({"dir": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="nowhere: no such folder"):
        data.kb_source()


def test_unknown_key_in_a_split_source_gets_a_close_match(tiny_recipe) -> None:
    with pytest.raises(RecipeError, match=r"data.splits.dev.feilds: unknown key; did you mean 'data.splits.dev.fields"):
        load_recipe(tiny_recipe(data={"splits": {"dev": {"path": "d.csv", "feilds": {}}}}))


def test_a_run_reads_its_data_from_sources_and_counts_duplicate_texts(tiny_data: Path, tiny_recipe,
                                                                      tmp_path: Path) -> None:
    passages = [json.loads(line) for line in (tiny_data / "passages.jsonl").read_text().splitlines()]
    copy = {**passages[0], "id": "copy-of-0"}  # the same text under another id
    pq.write_table(pa.Table.from_pylist([*passages, copy]), tmp_path / "kb.parquet")
    dev = [json.loads(line) for line in (tiny_data / "dev.jsonl").read_text().splitlines()]
    pq.write_table(pa.table({"q": [e["question"] for e in dev], "a": [e["answer"] for e in dev],
                             "gold": [e["gold_passage_ids"] for e in dev]}), tmp_path / "dev.parquet")
    data = {"passages": str(tmp_path / "kb.parquet"),
            "splits": {"dev": {"path": str(tmp_path / "dev.parquet"),
                               "fields": {"id": None, "context": None, "question": "q", "answer": "a",
                                          "gold_passage_ids": "gold"}}}}
    script = ("import json, sys; from jsarag.recipe import load_recipe; from jsarag.run import build_run; "
              "from jsarag.loop import counters; "
              "run = build_run(load_recipe(sys.argv[1], []), train=False, generator=False); "
              "print(json.dumps([len(run.ctx.kb), len(run.eval_sets['dev']), counters(run)['data']]))")
    env = child_env(HF_DATASETS_CACHE=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_recipe(data=data))], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    kb_size, dev_size, counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert (kb_size, dev_size) == (len(passages) + 1, sum(e["answer"] != UNANSWERABLE for e in dev))
    assert counts["kb_duplicate_texts"] == 1 and counts["dev_skipped"] == 0
