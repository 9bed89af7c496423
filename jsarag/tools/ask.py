"""``jsarag ask RUN_DIR_OR_EXPORT -q TEXT`` (or ``--questions FILE.jsonl``): the prior's ranked passages with their
scores and the generator's answer, with the trained models of a run folder (its latest checkpoint, or
``--checkpoint``) or of an export. Questions are ranked and answered as evaluation does (the prior's top
``eval.top_k``, the recipe's decoding), in batches of ``eval.batch_size``; ``-k`` passages of each are shown."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from jsarag.api import Batch, Example
from jsarag.errors import DataError
from jsarag.run import Run
from jsarag.tools.export import open_folder

SHOWN_CHARS = 200  # passage characters printed per passage for -q


def ask(folder: Path, question: str | None = None, questions: Path | None = None, k: int = 5,
        tag: str | None = None, out: Path | None = None, overrides: list[str] = ()) -> list[dict[str, Any]]:
    """Answer one question (printed for a reader) or a JSONL file of them (JSON lines on stdout, or into ``out``)."""
    examples = [_example({"question": question}, "question", 0)] if question is not None else read_questions(questions)
    out = out.resolve() if out is not None else None
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the answers alone (DeepSpeed prints as it starts)
        opened = open_folder(folder, tag, overrides=overrides)
        print(f"answering with {opened.describe()}")
        records = list(answers(opened.run, examples, k))
    if question is not None:
        print(readable(records[0]))
    else:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        out.write_text(lines, encoding="utf-8") if out is not None else sys.stdout.write(lines)
    return records


def read_questions(path: Path) -> list[Example]:
    """Questions from a JSONL file: ``{"question": ..., "id": ..., "context": [earlier turns, oldest first]}`` per
    line (id and context optional); a bad line is a DataError naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--questions {path}: cannot be read ({exc})") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        examples.append(_example(record, f"{path}:{number}", len(examples)))
    if not examples:
        raise DataError(f"--questions {path}: no questions in it")
    return examples


def _example(record: Any, where: str, position: int) -> Example:
    """An Example from one question record; anything but a non-empty question (and a list of strings as context) is
    a DataError naming where it came from."""
    if not isinstance(record, dict) or not isinstance(record.get("question"), str) or not record["question"].strip():
        raise DataError(f"{where}: needs a non-empty \"question\" string, e.g. {{\"question\": \"how long ...?\"}}")
    context = record.get("context", [])
    if not isinstance(context, list) or not all(isinstance(turn, str) for turn in context):
        raise DataError(f"{where}: \"context\" must be a list of the earlier turns (strings), oldest first")
    return Example(id=str(record.get("id", position)), context=tuple(context), question=record["question"],
                   answer="", answers=(), gold_passage_ids=())


def answers(run: Run, examples: list[Example], k: int) -> Iterator[dict[str, Any]]:
    """Rank and answer the examples batch by batch as evaluation does; one record per example."""
    top_k, size = min(run.recipe.eval.top_k, len(run.ctx.kb)), run.recipe.eval.batch_size
    with torch.no_grad():
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            batch = Batch(chunk, list(range(start, start + len(chunk))))
            candidates = run.rank(batch, top_k)
            replies = run.generate(batch, candidates) if run.generator is not None else [None] * len(batch)
            probs = candidates.prior_log_probs().exp()  # (B, top_k): the prior over its ranked passages
            for i, example in enumerate(batch.examples):
                yield {"id": example.id, "question": example.question, "answer": replies[i],
                       "passages": _passages(run, candidates.rows[i], candidates.prior_logits[i], probs[i], k)}


def _passages(run: Run, rows: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, k: int) -> list[dict]:
    """The first ``k`` ranked passages: rank, id, title, text, the prior's logit and probability over the top-k."""
    shown = []
    for rank, (row, logit, prob) in enumerate(zip(rows.tolist(), logits.tolist(), probs.tolist()), start=1):
        if row < 0 or rank > k:
            break
        passage = run.ctx.kb.passage(row)
        shown.append({"rank": rank, "id": passage.id, "title": passage.title, "text": passage.text,
                      "score": round(logit, 6), "prob": round(prob, 6)})
    return shown


def readable(record: dict[str, Any]) -> str:
    """One answered question as a reader wants it."""
    lines = [f"question: {record['question']}"]
    for p in record["passages"]:
        text = " ".join(f"{p['title']}: {p['text']}".split()) if p["title"] else " ".join(p["text"].split())
        text = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS].rstrip() + "…"
        lines.append(f"{p['rank']:>3}. p={p['prob']:.3f} score={p['score']:8.3f}  [{p['id']}] {text}")
    if record["answer"] is not None:
        lines.append(f"answer: {record['answer']}")
    return "\n".join(lines)
