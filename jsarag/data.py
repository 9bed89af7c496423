"""Examples in the data layout, where data comes from, and the query and history texts the models read.

A data folder holds ``passages.jsonl`` (the knowledge base, see ``jsarag.kb``) and ``train.jsonl``, ``dev.jsonl``,
``test.jsonl`` (any of them may be gzip-compressed as ``.jsonl.gz``), one JSON object a line. An example line reads::

    {"id": str, "context": [str, ...], "question": str, "answer": str, "answers": [str, ...],
     "gold_passage_ids": [str, ...]}

``context`` holds the earlier dialog turns, oldest first, alternating user and system, the last one being the
system's answer to the previous user turn (empty for single-turn QA). ``answer`` is the training target, ``answers``
the references for scoring (``[answer]`` when absent), ``gold_passage_ids`` serve retrieval metrics only.

Data may also come from anything the ``datasets`` library reads (a ``Source``: a JSON, CSV, TSV, Parquet or Arrow
file, a folder of such files, a folder written by ``save_to_disk``, a hub dataset name), with a field mapping from
our field names to the source's. JSONL files (``.jsonl``, ``.jsonl.gz``) are always read line by line and checked
here (the ``datasets`` JSON loader gives no line numbers), so each ``DataError`` names the file and line at fault;
other sources name the row (``<source> row N``, N counted from 0 as ``dataset[N]`` does). The line-reading helpers
are shared with ``jsarag.kb``. The package embeds DoQA cooking (CC BY-SA 4.0) as the default data folder,
``default_data_dir()``.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, overload

from jsarag.errors import DataError

if TYPE_CHECKING:
    import datasets

    from jsarag.kb import KnowledgeBase

log = logging.getLogger(__name__)

UNANSWERABLE = "CANNOTANSWER"  # DoQA's answer for a turn its passage does not answer
SKIPPED_LINES_SHOWN = 5  # line numbers quoted in the on_error="skip" summary
EXAMPLE_FIELDS = ("id", "context", "question", "answer", "answers", "gold_passage_ids")
PASSAGE_FIELDS = ("id", "title", "text")
REQUIRED_FIELDS = frozenset({"question", "text"})  # the fields a mapping may not set to null (absent)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")  # read line by line, with line numbers
BUILDERS = {".json": "json", ".json.gz": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
            ".arrow": "arrow"}  # other local files: the datasets builder that reads them
ROW_BATCH = 1024  # rows fetched at a time from a datasets source
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "squad", "org/name": what may be a hub dataset rather than a path


# ---------------------------------------------------------------------------------------------------------------------
# Reading and checking JSON lines (shared with jsarag.kb)


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw line) for each non-blank line of a .jsonl or .jsonl.gz file."""
    if not is_file(path):
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield number, line
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot be read ({err})") from err


def is_file(path: Path) -> bool:
    """Whether ``path`` is a file; a path the system cannot look up (too long, a NUL character) is a DataError."""
    return _looked_up(path, Path.is_file)


def is_dir(path: Path) -> bool:
    """Whether ``path`` is a folder; a path the system cannot look up is a DataError."""
    return _looked_up(path, Path.is_dir)


def _looked_up(path: Path, test) -> bool:
    try:
        return test(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{_cut(str(path))}: not a usable path ({getattr(err, 'strerror', None) or err})") from None


def parse_object(line: bytes, where: str) -> dict[str, Any]:
    """Parse one line as a JSON object; ``where`` ("<file> line <n>") prefixes any error."""
    try:
        value = json.loads(line)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise DataError(f"{where}: not valid JSON ({err})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(value)}")
    return value


def get_str(obj: dict[str, Any], key: str, where: str, *, non_empty: bool = False, numbers: bool = False,
            null_as_empty: bool = False) -> str:
    """Return ``obj[key]`` checked to be a string (and not blank, if asked).

    For typed sources (CSV, Parquet): ``numbers`` reads an integer as its decimal text, ``null_as_empty`` reads null
    (an empty CSV cell) as "".
    """
    value = _get(obj, key, where)
    if numbers and _is_int(value):
        value = str(value)
    elif null_as_empty and value is None:
        value = ""
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{key}" must be a string, got {_json_type(value)}')
    if non_empty and not value.strip():
        raise DataError(f'{where}: field "{key}" is empty')
    _check_unicode(value, key, where)
    return value


def get_str_list(obj: dict[str, Any], key: str, where: str, *, non_empty: bool = False,
                 numbers: bool = False) -> tuple[str, ...]:
    """Return ``obj[key]`` checked to be a list of strings (and not an empty list, if asked)."""
    value = _get(obj, key, where)
    if numbers and isinstance(value, list):
        value = [str(item) if _is_int(item) else item for item in value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataError(f'{where}: field "{key}" must be a list of strings, got {_json_type(value)}')
    if non_empty and not value:
        raise DataError(f'{where}: field "{key}" is an empty list')
    for item in value:
        _check_unicode(item, key, where)
    return tuple(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_unicode(value: str, key: str, where: str) -> None:
    """Refuse a string with a lone surrogate (JSON allows "\\ud800"; no tokenizer or Arrow table does)."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f'{where}: field "{key}" holds a lone surrogate {value[err.start]!r} at character '
                        f"{err.start}, not valid Unicode text; fix the line") from None


def _get(obj: dict[str, Any], key: str, where: str) -> Any:
    """Return ``obj[key]`` (a dotted key walks nested objects: ``answers.text``), or raise naming the missing field."""
    if key in obj:
        return obj[key]
    node: Any = obj
    for part in key.split(".") if "." in key else ():
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
    else:
        if "." in key:
            return node
    raise DataError(f'{where}: missing field "{key}"')


def has_field(obj: dict[str, Any], key: str) -> bool:
    """Whether ``obj`` holds ``key`` (dotted keys walk nested objects)."""
    try:
        _get(obj, key, "")
    except DataError:
        return False
    return True


def _cut(text: str, limit: int = 200) -> str:
    """Text cut to ``limit`` characters for an error message."""
    return text if len(text) <= limit else text[:limit] + "..."


def text_key(text: str) -> int:
    """A stable signed 64-bit key of a text, the same in every process (unlike ``hash``): to count distinct texts."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _json_type(value: Any) -> str:
    """Name a parsed JSON value's type as JSON does (for error messages)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


# ---------------------------------------------------------------------------------------------------------------------
# Sources: where a knowledge base or a split is read from


@dataclass(frozen=True)
class Source:
    """Where a knowledge base or a split is read from, and which of the source's fields hold ours."""

    path: str | Path  # a local file or folder, a save_to_disk folder, or (a str only) a hub dataset name
    name: str | None = None  # the hub dataset's configuration
    split: str | None = None  # the source's split; None: its only one
    # our field -> the source's (dotted: nested); None: the source has none
    fields: Mapping[str, str | None] = field(default_factory=lambda: MappingProxyType({}))


def field_map(fields: Mapping[str, str | None], ours: tuple[str, ...]) -> dict[str, str | None]:
    """Return our field -> the source's: the mapping given, the same name for the others; refuse a bad mapping."""
    unknown = sorted(set(fields) - set(ours))
    if unknown:
        raise DataError(f'field mapping: "{unknown[0]}" is not a field here; map any of {", ".join(ours)}')
    for ours_name, theirs in fields.items():
        if theirs is None and ours_name in REQUIRED_FIELDS:
            raise DataError(f'field mapping: "{ours_name}" cannot map to null: every row needs one')
        if theirs is not None and (not isinstance(theirs, str) or not theirs.strip()):
            raise DataError(f'field mapping: "{ours_name}" must map to a field name or null, got {theirs!r}')
    mapped = {name: fields.get(name, name) for name in ours}
    if "answer" in mapped and mapped["answer"] is None and mapped["answers"] is None:
        raise DataError('field mapping: "answer" and "answers" cannot both map to null')
    return mapped


def open_source(source: Path | str | Source, ours: tuple[str, ...]) -> JsonLines | DatasetRows:
    """Return the rows of a source: a JSONL file line by line, anything else through the ``datasets`` library."""
    if not isinstance(source, Source):
        source = Source(source)
    fields = field_map(source.fields, ours)
    path = source.path
    if not isinstance(path, Path) and not _is_local(path):
        return DatasetRows(source, fields, None)  # a hub dataset name
    local = Path(path).expanduser()
    if local.name.endswith(JSONL_SUFFIXES) and not is_dir(local):
        _one_split(source, local)
        return JsonLines(local, fields)  # read_lines says "no such file" if it is absent
    if is_file(local):
        _one_split(source, local)
    elif not is_dir(local):
        raise DataError(f"{local}: no such file or folder")
    return DatasetRows(source, fields, local)


def _is_local(path: str) -> bool:
    """Whether a source path names a local file or folder rather than a hub dataset."""
    local = Path(path).expanduser()
    if is_file(local) or is_dir(local):
        return True
    return not HUB_NAME.fullmatch(path) or path.endswith((*JSONL_SUFFIXES, *BUILDERS))


def _one_split(source: Source, file: Path) -> None:
    if source.split is not None:
        raise DataError(f"{file}: a file holds one split, so split: {source.split} cannot be chosen in it; give each "
                        "split its own file (data.splits.<name>: FILE)")


class JsonLines:
    """The lines of a .jsonl or .jsonl.gz file: (line number, raw line), parsed and checked by the caller."""

    unit = "line"
    typed = False  # JSON says what is a string: an integer id is an error

    def __init__(self, path: Path, fields: dict[str, str | None]) -> None:
        self.path = path
        self.label = str(path)  # names the file in errors, as the caller gave it
        self.fields = fields

    def identity(self) -> tuple[dict[str, Any], list[Any]]:
        """(which source, its state): the file's absolute path and the field mapping, its size and modification time."""
        if not is_file(self.path):
            raise DataError(f"{self.path}: no such file")
        path, size, mtime_ns = _file_identity(self.path)
        return {"jsonl": path, "fields": self.fields}, [size, mtime_ns]

    def rows(self) -> Iterator[tuple[int, bytes]]:
        """Yield (line number, raw line) for each non-blank line."""
        return read_lines(self.path)

    @staticmethod
    def parse(raw: bytes, where: str) -> dict[str, Any]:
        """Parse one line as a JSON object."""
        return parse_object(raw, where)


class DatasetRows:
    """The rows of anything the ``datasets`` library reads, as dicts; row N is ``dataset[N]``."""

    unit = "row"
    typed = True  # columns are typed (CSV, Parquet): an integer id reads as its decimal text

    def __init__(self, source: Source, fields: dict[str, str | None], local: Path | None) -> None:
        self.source = source
        self.fields = fields
        self.local = local  # None: a hub dataset
        self.path: Path | str = local if local is not None else str(source.path)
        self.label = str(self.path) + (f" [{source.name}]" if source.name else "")  # + " split S" once loaded
        self._dataset: datasets.Dataset | None = None

    def identity(self) -> tuple[dict[str, Any], Any]:
        """(which source, its state): path, configuration, split and mapping; its files' paths, sizes and times (a
        hub dataset: those of its files in the datasets cache, so it is loaded)."""
        which = {"path": str(self.local.resolve()) if self.local is not None else str(self.source.path),
                 "name": self.source.name, "split": self.source.split, "fields": self.fields}
        if self.local is None:
            dataset = self.dataset()
            files = [_file_identity(Path(f["filename"])) for f in dataset.cache_files]
            return which, files or getattr(dataset, "_fingerprint", None)
        files = [self.local] if is_file(self.local) else sorted(
            p for p in self.local.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                        p.relative_to(self.local).parts))
        return which, [_file_identity(p) for p in files]

    def dataset(self) -> datasets.Dataset:
        """Load the source (once) and pick its split."""
        if self._dataset is None:
            self._dataset = self._pick_split(self._load())
        return self._dataset

    def _load(self) -> datasets.Dataset | datasets.DatasetDict:
        import datasets

        source, local = self.source, self.local
        try:
            if local is not None and is_file(local):
                builder = _builder(local)
                options = {"delimiter": "\t"} if local.name.endswith(".tsv") else {}
                return datasets.load_dataset(builder, data_files=str(local), split="train", **options)
            if local is not None and any((local / name).is_file() for name in ("state.json", "dataset_dict.json")):
                return datasets.load_from_disk(str(local))
            return datasets.load_dataset(str(local or source.path), source.name)
        except DataError:
            raise
        except Exception as err:  # the datasets library raises many types (FileNotFoundError, ConnectionError, ...)
            reason = _cut(str(err).strip().splitlines()[0] if str(err).strip() else "", 300)
            hint = ("" if local is not None else "; not a local file or folder either: check the name, or go online "
                    "(HF_HUB_OFFLINE unset) to fetch it once")
            raise DataError(f"{self.label}: the datasets library cannot read it ({type(err).__name__}: {reason}){hint}"
                            ) from None

    def _pick_split(self, found: datasets.Dataset | datasets.DatasetDict) -> datasets.Dataset:
        import datasets

        if isinstance(found, datasets.Dataset):
            if self.source.split is not None and not (self.local is not None and is_file(self.local)):
                raise DataError(f"{self.label}: holds one split, so split: {self.source.split} cannot be chosen in "
                                "it; give each split its own source (data.splits.<name>)")
            return found
        names = list(found)
        split = self.source.split
        if split is None:
            if len(names) != 1:
                raise DataError(f"{self.label}: holds the splits {', '.join(names)}; choose one with split: NAME")
            split = names[0]
        elif split not in found:
            alias = {"dev": "validation", "validation": "dev"}.get(split)
            if alias not in found:
                raise DataError(f"{self.label}: no split \"{split}\"; present: {', '.join(names) or 'none'} "
                                "(choose one with split: NAME)")
            split = alias  # datasets names dev.* files "validation"
        self.label += f" split {split}"
        return found[split]

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (row number, row) for each row, with only the columns the mapping reads."""
        dataset = self.dataset()
        columns = list(dataset.column_names)
        needed: dict[str, None] = {}
        for ours, theirs in self.fields.items():
            if theirs is None:
                continue
            top = theirs if theirs in columns else theirs.split(".")[0]
            if top in columns:
                needed[top] = None
            elif not (ours == "answers" and theirs == "answers"):  # a missing "answers" defaults to [answer]
                null = "" if ours in REQUIRED_FIELDS else f", or fields.{ours}: null if it has none"
                raise DataError(f'{self.label}: no column "{top}" for the field "{ours}" (columns: '
                                f'{", ".join(columns)}); map it with fields.{ours}: COLUMN{null}')
        dataset = dataset.select_columns(list(needed))
        for start in range(0, len(dataset), ROW_BATCH):
            batch = dataset[start:start + ROW_BATCH]  # column -> values
            names = list(batch)
            for offset, values in enumerate(zip(*batch.values())):
                yield start + offset, dict(zip(names, values))

    @staticmethod
    def parse(raw: dict[str, Any], where: str) -> dict[str, Any]:
        """Return a row as it is (the datasets library parsed it)."""
        return raw


def _builder(file: Path) -> str:
    """The datasets builder that reads a local file, by its suffix."""
    for suffix, builder in BUILDERS.items():
        if file.name.endswith(suffix):
            return builder
    raise DataError(f"{file}: unknown file type; read are {', '.join((*JSONL_SUFFIXES, *BUILDERS))}, a folder of "
                    "them, or a folder written by save_to_disk")


def _file_identity(path: Path) -> list[Any]:
    """(absolute path, size, modification time in ns) of a file: a changed file gets a new identity."""
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


# ---------------------------------------------------------------------------------------------------------------------
# Data folders


EMBEDDED_DATASETS = ("doqa_cooking", "squad_v1.1")  # the folders of jsarag/datasets


def default_data_dir(name: str = "doqa_cooking") -> Path:
    """Return the folder of a dataset shipped with jsarag: DoQA cooking (the default) or SQuAD v1.1."""
    return Path(str(resources.files("jsarag.datasets") / name))


def split_path(data_dir: Path, split: str) -> Path:
    """Return ``<data_dir>/<split>.jsonl`` or ``.jsonl.gz``, whichever exists."""
    data_dir = Path(data_dir)
    if not is_dir(data_dir):
        raise DataError(f"{data_dir}: no such folder (data.dir must name a folder holding passages.jsonl and "
                        "<split>.jsonl[.gz] files)")
    found = [p for p in (data_dir / f"{split}.jsonl", data_dir / f"{split}.jsonl.gz") if is_file(p)]
    if len(found) == 2:
        raise DataError(f"{data_dir}: both {split}.jsonl and {split}.jsonl.gz exist; keep one")
    if not found:
        present = sorted({p.name.split(".")[0] for p in data_dir.glob("*.jsonl*")})
        raise DataError(f'{data_dir}: no split "{split}" ({split}.jsonl[.gz]); present: {", ".join(present) or "none"}')
    return found[0]


# ---------------------------------------------------------------------------------------------------------------------
# Examples


@dataclass(frozen=True)
class Passage:
    """One passage of the knowledge base."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Example:
    """One training or evaluation turn: dialog context, question, target answer, references, gold passages."""

    id: str
    context: tuple[str, ...]
    question: str
    answer: str
    answers: tuple[str, ...]
    gold_passage_ids: tuple[str, ...]


@dataclass(frozen=True)
class ExampleSet(Sequence[Example]):
    """The examples of one split, in source order, with what loading left out."""

    examples: tuple[Example, ...]
    path: Path | str  # the split file (a hub dataset: its name)
    skipped: int = 0  # bad lines skipped under on_error="skip"
    dropped_unanswerable: int = 0  # CANNOTANSWER examples dropped under drop_unanswerable=True

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Example, ...]: ...

    def __getitem__(self, index: int | slice) -> Example | tuple[Example, ...]:
        return self.examples[index]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


def load_examples(
    path: Path | str | Source,
    kb: KnowledgeBase | None,
    *,
    drop_unanswerable: bool = False,
    on_error: Literal["raise", "skip"] = "raise",
) -> ExampleSet:
    """Load and check a split (a file, or any ``Source``); with ``kb``, every gold passage id must be in it."""
    records = open_source(path, EXAMPLE_FIELDS)
    examples: list[Example] = []
    first_line: dict[str, int] = {}  # example id -> line (or row) number
    errors: list[tuple[int, DataError]] = []
    dropped = 0
    for index, (number, raw) in enumerate(records.rows()):
        where = f"{records.label} {records.unit} {number}"
        try:
            example = _parse_example(records.parse(raw, where), where, kb, first_line, records, index)
        except DataError as err:
            if on_error == "raise":
                raise
            errors.append((number, err))
            continue
        first_line[example.id] = number
        if drop_unanswerable and example.answer == UNANSWERABLE:
            dropped += 1
        else:
            examples.append(example)
    if errors:
        _log_skipped(records.label, records.unit, errors)
    if not examples and not dropped:
        skipped = f" ({len(errors)} bad {records.unit}s skipped)" if errors else ""
        raise DataError(f"{records.label}: no examples{skipped}")
    return ExampleSet(tuple(examples), records.path, skipped=len(errors), dropped_unanswerable=dropped)


def _parse_example(obj: dict[str, Any], where: str, kb: KnowledgeBase | None, first_line: dict[str, int],
                   records: JsonLines | DatasetRows, index: int) -> Example:
    """Check one example; ``first_line`` maps the ids seen so far to their numbers; ``index`` counts examples from 0."""
    f, typed, unit = records.fields, records.typed, records.unit
    example_id = str(index) if f["id"] is None else get_str(obj, f["id"], where, non_empty=True, numbers=typed)
    if example_id in first_line:
        raise DataError(f'{where}: duplicate example id "{example_id}" (first at {unit} {first_line[example_id]})')
    context = () if f["context"] is None else get_str_list(obj, f["context"], where)
    question = get_str(obj, f["question"], where, non_empty=True)
    if f["answer"] is None:  # the target is the first reference
        answers = get_str_list(obj, f["answers"], where, non_empty=True)
        answer = answers[0]
        if not answer.strip():
            raise DataError(f'{where}: field "{f["answers"]}" starts with an empty answer (the training target)')
    else:
        answer = get_str(obj, f["answer"], where, non_empty=True)
        present = f["answers"] is not None and has_field(obj, f["answers"])
        answers = get_str_list(obj, f["answers"], where, non_empty=True) if present else (answer,)
    gold_passage_ids = () if f["gold_passage_ids"] is None else get_str_list(obj, f["gold_passage_ids"], where,
                                                                              numbers=typed)
    if kb is not None:
        for pid in gold_passage_ids:
            if not kb.has(pid):
                raise DataError(f'{where}: gold passage id "{pid}" is not in the knowledge base {kb.path}')
    return Example(example_id, context, question, answer, answers, gold_passage_ids)


def _log_skipped(label: str, unit: str, errors: list[tuple[int, DataError]]) -> None:
    """Log one warning summarising the lines (rows) skipped under on_error="skip"."""
    numbers = ", ".join(str(number) for number, _ in errors[:SKIPPED_LINES_SHOWN])
    more = ", ..." if len(errors) > SKIPPED_LINES_SHOWN else ""
    first = errors[0][1]
    log.warning("%s: skipped %d bad %ss (%ss %s%s); first error: %s", label, len(errors), unit, unit, numbers, more,
                first)


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def render_query(ex: Example, max_history_turns: int) -> str:
    """The retriever's query x: the question, then up to ``max_history_turns`` earlier turns, newest first."""
    turns = _last_turns(ex, max_history_turns)
    if not turns:
        return ex.question
    history = " | ".join(f"{speaker}: {text}" for speaker, text in reversed(turns))
    return f"{ex.question} || {history}"


def render_posterior_query(ex: Example, max_history_turns: int, sep: str) -> str:
    """The posterior retriever's query: x, then ``sep``, then the answer y."""
    return render_query(ex, max_history_turns) + sep + ex.answer


def render_history(ex: Example, max_history_turns: int) -> str:
    """The last ``max_history_turns`` turns, oldest first, one "User: ..." / "Assistant: ..." line each."""
    labels = {"user": "User", "system": "Assistant"}
    return "\n".join(f"{labels[speaker]}: {text}" for speaker, text in _last_turns(ex, max_history_turns))


def _last_turns(ex: Example, n: int) -> list[tuple[str, str]]:
    """The last ``n`` context turns, oldest first, as (speaker, text); the last turn is the system's."""
    if n < 0:
        raise ValueError(f"max_history_turns must be >= 0, got {n}")
    size = len(ex.context)
    return [("system" if (size - i) % 2 else "user", ex.context[i]) for i in range(max(0, size - n), size)]
