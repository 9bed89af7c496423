"""The knowledge base K: the passages a retriever ranks and a generator reads.

``passages.jsonl`` (or ``passages.jsonl.gz``) holds one JSON object a line, ``{"id": str, "title": str, "text": str}``;
ids are unique and not empty, titles may be empty. Row ``i`` of a ``KnowledgeBase`` is the file's ``i``-th passage
(from 0, blank lines skipped): indexes store rows, examples name passages by id, and ``row()`` maps one to the other.
``fingerprint`` hashes the content in order, so a cached index can tell whether it was built for this KB.
Lines are checked by the helpers of ``jsarag.data``, so every ``DataError`` names the file and line at fault.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from pathlib import Path

import datasets
import pyarrow as pa

from jsarag.data import get_str, parse_object, read_lines
from jsarag.errors import DataError

PASSAGE_SCHEMA = pa.schema({"id": pa.string(), "title": pa.string(), "text": pa.string()})


@dataclass(frozen=True)
class Passage:
    """One passage of the knowledge base."""

    id: str
    title: str
    text: str


class KnowledgeBase:
    """The passages in file order: row i is (ids[i], titles[i], texts[i]); read-only once built."""

    def __init__(self, path: Path, ids: list[str], titles: list[str], texts: list[str]) -> None:
        self.path = path  # the passages file
        self.ids = ids
        self.titles = titles
        self.texts = texts
        # the same table in Arrow (columns id, title, text) for batched work such as encoding with ``map``;
        # the lists above give cheap row access in the training step
        self.dataset = datasets.Dataset(pa.table({"id": ids, "title": titles, "text": texts}, schema=PASSAGE_SCHEMA))
        self._rows = {passage_id: row for row, passage_id in enumerate(ids)}
        if len(self._rows) != len(ids):
            raise DataError(f"{path}: passage ids are not unique")

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, passage_id: str) -> int:
        """Return the row of a passage id."""
        if passage_id not in self._rows:
            raise DataError(f'passage id "{passage_id}" is not in the knowledge base {self.path}')
        return self._rows[passage_id]

    def has(self, passage_id: str) -> bool:
        """Tell whether a passage id is in the knowledge base."""
        return passage_id in self._rows

    def passage(self, row: int) -> Passage:
        """Return the passage at a row."""
        return Passage(self.ids[row], self.titles[row], self.texts[row])

    def render(self, row: int) -> str:
        """Return the text the models read for a row: "title: text", or the text alone when untitled."""
        title, text = self.titles[row], self.texts[row]
        return f"{title}: {text}" if title else text

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the ids, titles and texts in row order; independent of file name and compression."""
        digest = hashlib.sha256()
        for field in chain.from_iterable(zip(self.ids, self.titles, self.texts, strict=True)):
            data = field.encode()
            digest.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: fields cannot run together
        return digest.hexdigest()


def load_kb(path: Path) -> KnowledgeBase:
    """Load and check a passages.jsonl or passages.jsonl.gz file."""
    path = Path(path)
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}  # passage id -> line number
    for number, line in read_lines(path):
        where = f"{path} line {number}"
        obj = parse_object(line, where)
        passage_id = get_str(obj, "id", where, non_empty=True)
        if passage_id in first_line:
            raise DataError(f'{where}: duplicate passage id "{passage_id}" (first at line {first_line[passage_id]})')
        first_line[passage_id] = number
        ids.append(passage_id)
        titles.append(get_str(obj, "title", where))
        texts.append(get_str(obj, "text", where))
    if not ids:
        raise DataError(f"{path}: no passages (the file is empty)")
    return KnowledgeBase(path, ids, titles, texts)
