"""The knowledge base K: the passages a retriever ranks and a generator reads, memory-mapped from a cache folder.

``passages.jsonl`` (or ``passages.jsonl.gz``, or any ``jsarag.data.Source`` with a field mapping) holds one passage a
line, ``{"id": str, "title": str, "text": str}``; ids are unique and not empty, titles may be empty. Row ``i`` of a
``KnowledgeBase`` is the source's ``i``-th passage (from 0, blank lines skipped): indexes store rows, examples name
passages by id, and ``row()`` maps one to the other.

The first ``load_kb`` of a source checks every passage (each ``DataError`` names the file and line, or row) and
converts it once into a folder of the KB cache (``kb_cache_dir()``), keyed by the source's identity (path, size and
modification time of its files, and the field mapping), so a changed file is converted again:

- ``passages.arrow``: the passages as an Arrow IPC stream (columns id, title, text; record batches of exactly
  ``BATCH_ROWS`` rows, so row r lives in batch ``r >> BATCH_SHIFT``), memory-mapped: a rank's resident memory does
  not grow with the KB, the page cache holds what is read (``datasets.Dataset.from_file`` opens it for batched work);
- ``slots.npy``: an open-addressing hash table (linear probing) of (64-bit BLAKE2b key of the id, row), memory-mapped,
  so ``row(id)`` is O(1) (about 1.5 probes; a hit is verified against the stored id) with no dict of all ids;
- ``meta.json`` (written last): the fingerprint, the count of duplicate texts, the source it came from.

The conversion writes into a temporary sibling folder renamed into place under a file lock, so concurrent ranks
convert once and a killed conversion leaves nothing that is read later (its leftover is removed by the next one).
``fingerprint`` (SHA-256 over the length-prefixed ids, titles and texts in row order, independent of file name and
compression) is computed during that conversion and stored, so a cached index can tell whether it was built for this
KB without rereading the text.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from jsarag.data import PASSAGE_FIELDS, DatasetRows, JsonLines, Passage, Source, get_str, open_source
from jsarag.errors import DataError
from jsarag.files import atomic_folder

log = logging.getLogger(__name__)

FORMAT = 1  # the cache folder's layout; bump it and every KB is converted afresh
BATCH_SHIFT = 15
BATCH_ROWS = 1 << BATCH_SHIFT  # rows per Arrow record batch (the last may hold fewer)
PASSAGE_SCHEMA = pa.schema({"id": pa.large_string(), "title": pa.large_string(), "text": pa.large_string()})
SLOT = np.dtype([("key", "<u8"), ("row", "<i4")], align=False)  # one hash-table slot, 12 bytes; row -1: empty
LOAD = 1.5  # slots >= LOAD x passages, a power of two: a load factor between 1/3 and 2/3
CACHE_ENV = "JSARAG_KB_CACHE"
_WARNED: set[str] = set()  # fingerprints whose duplicate texts this process has warned about


def kb_cache_dir() -> Path:
    """Return where converted knowledge bases live: ``$JSARAG_KB_CACHE``, else ``<jsarag cache>/kb``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from jsarag.models import cache_dir

    return cache_dir() / "kb"


class Column(Sequence[str]):
    """One field of the knowledge base by row: a read-only view of the memory-mapped Arrow batches."""

    def __init__(self, chunks: list[pa.Array], length: int) -> None:
        self._chunks = chunks  # chunk b holds rows b*BATCH_ROWS ...
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        row = index.__index__()
        if not -self._length <= row < self._length:
            raise IndexError(f"row {row} is out of range for {self._length} passages")
        row %= self._length
        return self._chunks[row >> BATCH_SHIFT][row & (BATCH_ROWS - 1)].as_py()

    def __iter__(self) -> Iterator[str]:
        for chunk in self._chunks:  # one batch in memory at a time
            yield from chunk.to_pylist()


class IdColumn(Column):
    """The ids by row; ``in`` asks the hash table (O(1))."""

    def __init__(self, chunks: list[pa.Array], length: int, kb: KnowledgeBase) -> None:
        super().__init__(chunks, length)
        self._kb = kb

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and self._kb.has(value)


class KnowledgeBase:
    """The passages in source order: row i is (ids[i], titles[i], texts[i]); memory-mapped and read-only."""

    def __init__(self, path: Path | str, table: pa.Table, slots: np.ndarray, info: dict[str, Any],
                 store: Path | None = None) -> None:
        self.path = path  # the passages file (a hub dataset: its name)
        self.store = store  # the cache folder it is mapped from (None: built in memory)
        self.fingerprint: str = info["fingerprint"]
        self.duplicate_texts: int = info["duplicate_texts"]  # passages repeating an earlier passage's text
        self.duplicate_text_example: list[str] | None = info.get("duplicate_text_example")  # [earlier id, later id]
        self._length = table.num_rows
        batches = table.to_batches()
        if any(b.num_rows != BATCH_ROWS for b in batches[:-1]) or info.get("batch_rows", BATCH_ROWS) != BATCH_ROWS:
            raise ValueError("record batches are not of BATCH_ROWS rows")
        columns = [[b.column(i) for b in batches] for i in range(3)]
        self.ids: Sequence[str] = IdColumn(columns[0], self._length, self)
        self.titles: Sequence[str] = Column(columns[1], self._length)
        self.texts: Sequence[str] = Column(columns[2], self._length)
        self._id_chunks, self._title_chunks, self._text_chunks = columns
        self._keys = slots["key"]  # (S,) uint64 views into the memory-mapped table
        self._rows = slots["row"]  # (S,) int32
        self._mask = len(slots) - 1

    @classmethod
    def from_lists(cls, path: Path | str, ids: Sequence[str], titles: Sequence[str],
                   texts: Sequence[str]) -> KnowledgeBase:
        """Build a knowledge base in memory from its fields, checked as a file's lines are (rows from 0)."""
        if not len(ids) == len(titles) == len(texts):
            raise ValueError(f"{len(ids)} ids, {len(titles)} titles and {len(texts)} texts: one of each per passage")
        rows = ((i, {"id": p, "title": t, "text": x}) for i, (p, t, x) in enumerate(zip(ids, titles, texts)))
        records = _Listed(str(path), rows)
        sink = pa.BufferOutputStream()
        built = _write(records, sink)
        table = pa.ipc.open_stream(sink.getvalue()).read_all()
        slots, info = _finish(built, table, records)
        return _noticed(cls(path, table, slots, info))

    def __len__(self) -> int:
        return self._length

    def row(self, passage_id: str) -> int:
        """Return the row of a passage id."""
        row = self._find(passage_id)
        if row < 0:
            raise DataError(f'passage id "{passage_id}" is not in the knowledge base {self.path}')
        return row

    def has(self, passage_id: str) -> bool:
        """Tell whether a passage id is in the knowledge base."""
        return self._find(passage_id) >= 0

    def id(self, row: int) -> str:
        """Return the passage id at a row."""
        return self.ids[row]

    def passage(self, row: int) -> Passage:
        """Return the passage at a row."""
        return Passage(self.ids[row], self.titles[row], self.texts[row])

    def render(self, row: int) -> str:
        """Return the text the models read for a row: "title: text", or the text alone when untitled."""
        title, text = self.titles[row], self.texts[row]
        return f"{title}: {text}" if title else text

    def render_many(self, rows: Iterable[int]) -> list[str]:
        """Return ``render(r)`` for each row, in order."""
        titles, texts, n, low = self._title_chunks, self._text_chunks, self._length, BATCH_ROWS - 1
        out = []
        for row in rows:
            row = row.__index__()
            if not 0 <= row < n:
                raise IndexError(f"row {row} is out of range for {n} passages")
            batch, offset = row >> BATCH_SHIFT, row & low
            title, text = titles[batch][offset].as_py(), texts[batch][offset].as_py()
            out.append(f"{title}: {text}" if title else text)
        return out

    def _find(self, passage_id: str) -> int:
        """The row of a passage id, or -1: probe the slots from the id's key until its own or an empty one."""
        key = _key(passage_id)
        keys, rows, mask = self._keys, self._rows, self._mask
        slot = key & mask
        while True:
            row = int(rows[slot])
            if row < 0:
                return -1
            if int(keys[slot]) == key and self._id_chunks[row >> BATCH_SHIFT][row & (BATCH_ROWS - 1)].as_py() \
                    == passage_id:
                return row
            slot = (slot + 1) & mask


def load_kb(source: Path | str | Source) -> KnowledgeBase:
    """Load a knowledge base: checked and converted into the KB cache the first time, memory-mapped after."""
    records = open_source(source, PASSAGE_FIELDS)
    what, state = records.identity()
    root = kb_cache_dir()
    which = _digest(what)  # this source, whatever its content
    folder = root / f"{which}-{_digest([FORMAT, state])}"
    kb = _open_store(folder, records.path)
    if kb is None:
        kb = _convert_locked(records, root, which, folder)
    return _noticed(kb)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# The cache folder


def _open_store(folder: Path, path: Path | str) -> KnowledgeBase | None:
    """Map a converted folder; None if there is none, or it is incomplete or of another format."""
    try:
        info = json.loads((folder / "meta.json").read_text())
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            return None
        table = pa.ipc.open_stream(pa.memory_map(str(folder / "passages.arrow"))).read_all()
        slots = np.load(folder / "slots.npy", mmap_mode="r")  # (S,) SLOT
        if table.num_rows != info["rows"] or slots.dtype != SLOT or len(slots) != info["slots"]:
            return None
        return KnowledgeBase(path, table, slots, info, folder)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None


def _convert_locked(records: JsonLines | DatasetRows, root: Path, which: str, folder: Path) -> KnowledgeBase:
    """Convert under a lock (ranks sharing the cache convert once); drop leftovers and older versions of the source."""
    from filelock import FileLock

    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / f".{which}.lock"))
        lock.acquire()
    except OSError as err:
        raise DataError(f"{root}: cannot write the knowledge-base cache here ({err.strerror or err}); set "
                        f"{CACHE_ENV} to a writable folder") from None
    try:
        kb = _open_store(folder, records.path)  # another process may have converted it while we waited
        if kb is not None:
            return kb
        for old in root.glob(f"*{which}-*"):  # killed conversions (.tmp-...), a broken or older version
            log.info("removing %s (an older or unfinished conversion of %s)", old, records.label)
            shutil.rmtree(old, ignore_errors=True)
        started = time.perf_counter()
        _convert(records, folder)
        kb = _open_store(folder, records.path)
        if kb is None:
            raise DataError(f"{folder}: the converted knowledge base cannot be read back; delete the folder")
        log.info("converted %d passages of %s into %s in %.1f s", len(kb), records.label, folder,
                 time.perf_counter() - started)
        return kb
    finally:
        lock.release()


def _convert(records: JsonLines | DatasetRows, folder: Path) -> None:
    """Check and write the passages into a temporary folder, then rename it to ``folder``."""
    _, state = records.identity()
    with atomic_folder(folder, tmp_prefix=f".tmp-{folder.name}-") as tmp:
        with pa.OSFile(str(tmp / "passages.arrow"), "wb") as sink:
            built = _write(records, sink)
        table = pa.ipc.open_stream(pa.memory_map(str(tmp / "passages.arrow"))).read_all()
        slots, info = _finish(built, table, records)
        np.save(tmp / "slots.npy", slots)
        if records.identity()[1] != state:
            raise DataError(f"{records.label}: changed while it was being converted; load it again")
        info.update(format=FORMAT, source=records.label, path=str(records.path), rows=len(table),
                    slots=len(slots), batch_rows=BATCH_ROWS)
        (tmp / "meta.json").write_text(json.dumps(info, indent=1))


# ---------------------------------------------------------------------------------------------------------------------
# Conversion: check, write, hash


class _Listed:
    """Passages given as (row, dict) pairs: the records of ``KnowledgeBase.from_lists``."""

    unit = "row"
    typed = False
    fields = {name: name for name in PASSAGE_FIELDS}

    def __init__(self, label: str, rows: Iterator[tuple[int, dict[str, Any]]]) -> None:
        self.label = self.path = label
        self._rows = rows

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        return self._rows

    @staticmethod
    def parse(raw: dict[str, Any], where: str) -> dict[str, Any]:
        return raw


@dataclass
class _Written:
    """What ``_write`` learnt of the passages on the way: keys, line numbers, fingerprint, the first bad line."""

    id_keys: array  # (n,) uint64 key of each id
    text_keys: array  # (n,) uint64 key of each text
    numbers: array  # (n,) line (or row) number of each passage
    fingerprint: str
    failure: DataError | None


def _write(records: Any, sink: pa.NativeFile) -> _Written:
    """Check passages in order and write them to ``sink`` as Arrow batches, until the end or the first bad one."""
    fields, unit, typed = records.fields, records.unit, records.typed
    id_keys, text_keys, numbers = array("Q"), array("Q"), array("q")
    digest = hashlib.sha256()
    batch: tuple[list[str], list[str], list[str]] = ([], [], [])
    failure = None
    with pa.ipc.new_stream(sink, PASSAGE_SCHEMA) as writer:
        try:
            for number, raw in records.rows():
                where = f"{records.label} {unit} {number}"
                obj = records.parse(raw, where)
                index = len(numbers)
                passage_id = str(index) if fields["id"] is None else get_str(obj, fields["id"], where, non_empty=True,
                                                                             numbers=typed)
                title = "" if fields["title"] is None else get_str(obj, fields["title"], where, null_as_empty=typed)
                text = get_str(obj, fields["text"], where)
                for value, column in zip((passage_id, title, text), batch):
                    data = value.encode("utf-8")
                    digest.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: fields cannot run together
                    column.append(value)
                id_keys.append(_key(passage_id))
                text_keys.append(_key(text))
                numbers.append(number)
                if len(batch[0]) == BATCH_ROWS:
                    writer.write_batch(_batch(batch))
        except DataError as err:
            failure = err  # raised after the passages before it are checked for duplicate ids
        if batch[0]:
            writer.write_batch(_batch(batch))
    return _Written(id_keys, text_keys, numbers, digest.hexdigest(), failure)


def _batch(columns: tuple[list[str], list[str], list[str]]) -> pa.RecordBatch:
    """Turn the pending rows into a record batch and empty the lists."""
    batch = pa.record_batch([pa.array(c, pa.large_string()) for c in columns], schema=PASSAGE_SCHEMA)
    for column in columns:
        column.clear()
    return batch


def _finish(built: _Written, table: pa.Table, records: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Refuse duplicate ids (else the first bad line), build the id slots, count duplicate texts."""
    unit, numbers = records.unit, built.numbers
    ids = Column([b.column(0) for b in table.to_batches()], table.num_rows)
    duplicate = _first_repeat(np.frombuffer(built.id_keys, dtype=np.uint64), ids)
    if duplicate is not None:
        first, again = duplicate
        raise DataError(f'{records.label} {unit} {numbers[again]}: duplicate passage id "{ids[again]}" '
                        f"(first at {unit} {numbers[first]})")
    if built.failure is not None:
        raise built.failure
    if not len(numbers):
        raise DataError(f"{records.label}: no passages (the file is empty)")
    texts = Column([b.column(2) for b in table.to_batches()], table.num_rows)
    repeats, example = _repeats(np.frombuffer(built.text_keys, dtype=np.uint64), texts)
    info = {"fingerprint": built.fingerprint, "duplicate_texts": repeats,
            "duplicate_text_example": [ids[example[0]], ids[example[1]]] if example else None}
    return _slot_table(np.frombuffer(built.id_keys, dtype=np.uint64)), info


def _key(text: str) -> int:
    """A stable unsigned 64-bit key of a string (BLAKE2b), the same in every process."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _equal_key_groups(keys: np.ndarray) -> Iterator[np.ndarray]:
    """Yield the rows (ascending) of each group of two or more equal keys; O(n log n) for the sort."""
    if len(keys) < 2:
        return
    order = np.argsort(keys, kind="stable")  # (n,)
    same = np.flatnonzero(keys[order][1:] == keys[order][:-1])  # sorted position i equals i + 1
    if not same.size:
        return
    breaks = np.flatnonzero(np.diff(same) != 1)
    starts = np.concatenate(([same[0]], same[breaks + 1]))
    ends = np.concatenate((same[breaks], [same[-1]])) + 2
    for start, end in zip(starts.tolist(), ends.tolist()):
        yield order[start:end]


def _first_repeat(keys: np.ndarray, values: Column) -> tuple[int, int] | None:
    """(first row, repeating row) of the earliest row whose value repeats an earlier one's, verified; None if none."""
    found = None
    for group in _equal_key_groups(keys):
        seen: dict[str, int] = {}
        for row in group.tolist():
            value = values[row]
            if value in seen and (found is None or row < found[1]):
                found = (seen[value], row)
            seen.setdefault(value, row)
    return found


def _repeats(keys: np.ndarray, values: Column) -> tuple[int, tuple[int, int] | None]:
    """How many rows repeat an earlier row's value (verified), and the earliest such (first, repeat) pair."""
    count, example = 0, None
    for group in _equal_key_groups(keys):
        seen: dict[str, int] = {}
        for row in group.tolist():
            value = values[row]
            if value in seen:
                count += 1
                if example is None or row < example[1]:
                    example = (seen[value], row)
            else:
                seen[value] = row
    return count, example


def _slot_table(keys: np.ndarray) -> np.ndarray:
    """An open-addressing table of (key, row) with linear probing, built vectorised; (S,) SLOT, S a power of two.

    Each round places, for every free slot some pending row probes, the first such row; the others move one slot on.
    A row only ever moves past an occupied slot, so a lookup that probes from key & mask to the first empty slot
    meets it. Rounds: the longest probe sequence; work: O(n x mean probes) plus a sort per round.
    """
    n = len(keys)
    if n >= 2**31:
        raise DataError(f"{n} passages: more than a knowledge base holds (2**31 - 1)")
    size = 1 << max(1, int(np.ceil(n * LOAD)).bit_length())
    slots = np.empty(size, SLOT)
    slots["row"] = -1
    slots["key"] = 0
    mask = np.uint64(size - 1)
    pending = np.arange(n, dtype=np.int64)  # rows not placed yet
    position = (keys & mask).astype(np.int64)  # the slot each pending row tries next
    taken = slots["row"]
    while pending.size:
        free = np.flatnonzero(taken[position] < 0)
        slots_free, first = np.unique(position[free], return_index=True)
        winners = pending[free[first]]
        slots["row"][slots_free] = winners
        slots["key"][slots_free] = keys[winners]
        placed = np.zeros(pending.size, dtype=bool)
        placed[free[first]] = True
        pending, position = pending[~placed], (position[~placed] + 1) & (size - 1)
    return slots


def _noticed(kb: KnowledgeBase) -> KnowledgeBase:
    """Warn once per process about a KB whose passages repeat texts under other ids."""
    if kb.duplicate_texts and kb.fingerprint not in _WARNED:
        _WARNED.add(kb.fingerprint)
        first, again = kb.duplicate_text_example or ("?", "?")
        log.warning('%s: %d passages repeat the text of an earlier passage under another id (the first: "%s" repeats '
                    '"%s"); the retrievers rank them as different passages: deduplicate the KB if they are copies',
                    kb.path, kb.duplicate_texts, again, first)
    return kb
