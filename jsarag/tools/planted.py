"""The planted-retrieval data of ``jsarag bench estimators``: facts about invented people, one passage each.

Each person has an invented name (syllables drawn at random, so no model has seen it) and a home city drawn at random
from 48 city names (one word each), written in one passage: ``"oslo is the home of zorvel kabex ."``. A question asks
for one person's home (``"where does zorvel kabex live ?"``, three wordings); its answer is the city, which nothing but
that person's passage tells: without the right passage an answer is right by chance (1/48). The train split asks about
some people, the dev split about others (every wording for each), whose passages are in the same KB, so a dev answer
needs retrieval and reading, not memory. Written deterministically from (people, dev share, seed).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SYLLABLES = ("ka", "zor", "mi", "vel", "tun", "ra", "bex", "quo", "lin", "dra", "fen", "sol", "wix", "bar", "thu",
             "ny", "gor", "pel", "siv", "mak", "dun", "ori", "xel", "tra")
CITIES = ("paris london tokyo berlin madrid rome cairo lima oslo dublin vienna prague warsaw athens lisbon moscow "
          "delhi seoul beijing sydney toronto chicago boston denver dallas miami seattle houston phoenix atlanta "
          "detroit portland austin nashville memphis orlando tampa omaha tulsa reno boise salem dover albany trenton "
          "richmond raleigh lincoln").split()
PASSAGE = "{city} is the home of {name} ."
QUESTIONS = ("where does {name} live ?", "what is the home of {name} ?", "which city is home to {name} ?")
SETTINGS = "settings.json"


def invented_names(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct two-word names of two syllables each (e.g. "zorvel kabex")."""
    names: dict[str, None] = {}
    while len(names) < count:
        names[" ".join("".join(rng.choice(SYLLABLES) for _ in range(2)) for _ in range(2))] = None
    return list(names)


def planted_data(people: int, dev_share: float, seed: int) -> dict[str, list[dict]]:
    """The passages and the train/dev examples (the data layout's fields) of a planted task."""
    rng = random.Random(seed)
    names = invented_names(people, rng)
    homes = [rng.choice(CITIES) for _ in names]
    passages = [{"id": f"p{i:04d}", "title": "", "text": PASSAGE.format(city=city, name=name)}
                for i, (name, city) in enumerate(zip(names, homes))]
    order = list(range(people))
    rng.shuffle(order)
    dev = set(order[:round(dev_share * people)])
    splits: dict[str, list[dict]] = {"train": [], "dev": []}
    for i, (name, city) in enumerate(zip(names, homes)):
        split = "dev" if i in dev else "train"
        for j, wording in enumerate(QUESTIONS):
            splits[split].append({"id": f"q{i:04d}-{j}", "context": [], "question": wording.format(name=name),
                                  "answer": city, "answers": [city], "gold_passage_ids": [passages[i]["id"]]})
    rng.shuffle(splits["train"])
    return {"passages": passages, **splits}


def write_planted(folder: Path, people: int, dev_share: float, seed: int) -> Path:
    """Write the planted task into ``folder`` (passages.jsonl, train.jsonl, dev.jsonl) unless it already holds the
    same task; a folder holding another task is an error."""
    from jsarag.checkpoint import atomic_write
    from jsarag.errors import DataError

    settings = {"people": people, "dev_share": dev_share, "seed": seed, "version": 2}
    stamp = folder / SETTINGS
    if stamp.is_file():
        if json.loads(stamp.read_text()) != settings:
            raise DataError(f"{folder}: holds a planted task with other settings ({stamp.read_text().strip()}); "
                            "remove the folder or choose another --out")
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder}: exists and is no planted-task folder (no {SETTINGS}); choose another --out")
    for name, rows in planted_data(people, dev_share, seed).items():
        atomic_write(folder / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write(stamp, json.dumps(settings) + "\n")
    return folder
