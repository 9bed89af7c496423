"""``jsarag data subset``: a small, self-consistent data folder cut from a large one.

Examples are drawn (seeded) from each split in turn, one at a time, keeping only answerable examples (CANNOTANSWER turns are dropped) whose gold
passages fit the passage budget together with those already chosen; the rest of the budget is filled with other
passages of the KB (seeded distractors). Every gold id of a written example is in the written KB, so the folder
loads like any other. Used for studies that score every passage (``jsarag diagnose grad-variance``) and for quick
experiments: ``jsarag data subset runs/doqa-64 --passages 64 --split train:32 --split dev:16``.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from jsarag.data import Example, default_data_dir, load_examples, split_path
from jsarag.errors import DataError, RecipeError
from jsarag.files import atomic_write

if TYPE_CHECKING:
    from jsarag.kb import KnowledgeBase


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jsarag data subset``."""
    parser.add_argument("out", type=Path, help="folder to write (passages.jsonl and one <split>.jsonl per --split)")
    parser.add_argument("--from", dest="source", type=Path, help="data folder to cut from (default: embedded DoQA)")
    parser.add_argument("--passages", type=int, default=64, help="passages in the subset's KB")
    parser.add_argument("--split", action="append", metavar="NAME:COUNT", help="examples to take from a split "
                        "(repeatable; default train:32 and dev:16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw")


def main(args: argparse.Namespace) -> int:
    """Write the subset and say what it holds."""
    from jsarag.kb import load_kb  # datasets and pyarrow: only when the command runs

    source = args.source or default_data_dir()
    wanted = parse_splits(args.split or ["train:32", "dev:16"])
    kb = load_kb(split_path(source, "passages"))
    splits = {name: load_examples(split_path(source, name), kb, drop_unanswerable=True) for name in wanted}
    chosen, rows = draw(kb, splits, wanted, args.passages, args.seed)
    write(args.out, kb, rows, chosen)
    counts = ", ".join(f"{name} {len(examples)}" for name, examples in chosen.items())
    print(f"wrote {args.out}: {len(rows)} passages ({sum(map(len, chosen.values()))} examples: {counts}) from {source}")
    return 0


def parse_splits(items: list[str]) -> dict[str, int]:
    """``["train:32", "dev:16"]`` -> {"train": 32, "dev": 16}."""
    wanted: dict[str, int] = {}
    for item in items:
        name, _, count = item.partition(":")
        if not name or not count.isdigit() or int(count) < 1 or "/" in name:
            raise RecipeError(f"--split {item!r}: write NAME:COUNT, e.g. train:32")
        wanted[name] = int(count)
    return wanted


def draw(kb: KnowledgeBase, splits: dict[str, list[Example]], wanted: dict[str, int], budget: int,
         seed: int) -> tuple[dict[str, list[Example]], list[int]]:
    """Choose examples round-robin across splits within the passage budget; return them and the KB rows kept."""
    rng = random.Random(seed)
    queues = {name: rng.sample(list(examples), len(examples)) for name, examples in splits.items()}
    chosen: dict[str, list[Example]] = {name: [] for name in wanted}
    rows: dict[int, None] = {}  # insertion-ordered set of KB rows
    while any(len(chosen[n]) < wanted[n] and queues[n] for n in wanted):
        for name in wanted:
            while len(chosen[name]) < wanted[name] and queues[name]:
                example = queues[name].pop()
                gold = [kb.row(pid) for pid in example.gold_passage_ids]
                if gold and len(rows.keys() | set(gold)) <= budget:
                    chosen[name].append(example)
                    rows.update(dict.fromkeys(gold))
                    break
    if not rows:
        raise DataError(f"no answerable example with gold passages fits {budget} passages")
    others = [r for r in range(len(kb)) if r not in rows]
    rows.update(dict.fromkeys(rng.sample(others, min(len(others), budget - len(rows)))))
    return chosen, sorted(rows)


def write(out: Path, kb: KnowledgeBase, rows: list[int], chosen: dict[str, list[Example]]) -> None:
    """Write the KB rows and the chosen examples in the shared layout."""
    passages = "".join(json.dumps(vars(kb.passage(r))) + "\n" for r in rows)
    atomic_write(Path(out) / "passages.jsonl", passages)
    for name, examples in chosen.items():
        lines = "".join(json.dumps({"id": e.id, "context": list(e.context), "question": e.question, "answer": e.answer,
                                    "answers": list(e.answers), "gold_passage_ids": list(e.gold_passage_ids)}) + "\n"
                        for e in examples)
        atomic_write(Path(out) / f"{name}.jsonl", lines)
