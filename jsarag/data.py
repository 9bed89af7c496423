"""Examples in the data layout, and the query and history texts the models read.

A data folder holds ``passages.jsonl`` (the knowledge base, see ``jsarag.kb``) and ``train.jsonl``, ``dev.jsonl``,
``test.jsonl`` (any of them may be gzip-compressed as ``.jsonl.gz``), one JSON object a line. An example line reads::

    {"id": str, "context": [str, ...], "question": str, "answer": str, "answers": [str, ...],
     "gold_passage_ids": [str, ...]}

``context`` holds the earlier dialog turns, oldest first, alternating user and system, the last one being the
system's answer to the previous user turn (empty for single-turn QA). ``answer`` is the training target, ``answers``
the references for scoring (``[answer]`` when absent), ``gold_passage_ids`` serve retrieval metrics only.

Every file is read line by line and checked here (the ``datasets`` JSON loader gives no line numbers), so each
``DataError`` names the file and line at fault. The line-reading helpers are shared with ``jsarag.kb``.
The package embeds DoQA cooking (CC BY-SA 4.0) as the default data folder, ``default_data_dir()``.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from jsarag.errors import DataError

if TYPE_CHECKING:
    from jsarag.kb import KnowledgeBase

log = logging.getLogger(__name__)

UNANSWERABLE = "CANNOTANSWER"  # DoQA's answer for a turn its passage does not answer
SKIPPED_LINES_SHOWN = 5  # line numbers quoted in the on_error="skip" summary


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
    try:
        return path.is_file()
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


def get_str(obj: dict[str, Any], key: str, where: str, *, non_empty: bool = False) -> str:
    """Return ``obj[key]`` checked to be a string (and not blank, if asked)."""
    value = _get(obj, key, where)
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{key}" must be a string, got {_json_type(value)}')
    if non_empty and not value.strip():
        raise DataError(f'{where}: field "{key}" is empty')
    _check_unicode(value, key, where)
    return value


def get_str_list(obj: dict[str, Any], key: str, where: str, *, non_empty: bool = False) -> tuple[str, ...]:
    """Return ``obj[key]`` checked to be a list of strings (and not an empty list, if asked)."""
    value = _get(obj, key, where)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DataError(f'{where}: field "{key}" must be a list of strings, got {_json_type(value)}')
    if non_empty and not value:
        raise DataError(f'{where}: field "{key}" is an empty list')
    for item in value:
        _check_unicode(item, key, where)
    return tuple(value)


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
    """Return ``obj[key]``, or raise a DataError naming the missing field."""
    if key not in obj:
        raise DataError(f'{where}: missing field "{key}"')
    return obj[key]


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
# Data folders


def default_data_dir() -> Path:
    """Return the folder of the embedded default dataset, DoQA cooking."""
    return Path(str(resources.files("jsarag.datasets") / "doqa_cooking"))


def split_path(data_dir: Path, split: str) -> Path:
    """Return ``<data_dir>/<split>.jsonl`` or ``.jsonl.gz``, whichever exists."""
    data_dir = Path(data_dir)
    found = [p for p in (data_dir / f"{split}.jsonl", data_dir / f"{split}.jsonl.gz") if is_file(p)]
    if len(found) == 2:
        raise DataError(f"{data_dir}: both {split}.jsonl and {split}.jsonl.gz exist; keep one")
    if not found:
        present = sorted({p.name.split(".")[0] for p in data_dir.glob("*.jsonl*")}) if data_dir.is_dir() else []
        raise DataError(f'{data_dir}: no split "{split}" ({split}.jsonl[.gz]); present: {", ".join(present) or "none"}')
    return found[0]


# ---------------------------------------------------------------------------------------------------------------------
# Examples


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
    """The examples of one split file, in file order, with what loading left out."""

    examples: tuple[Example, ...]
    path: Path
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
    path: Path,
    kb: KnowledgeBase | None,
    *,
    drop_unanswerable: bool = False,
    on_error: Literal["raise", "skip"] = "raise",
) -> ExampleSet:
    """Load and check a split file; with ``kb``, every gold passage id must be in it."""
    path = Path(path)
    examples: list[Example] = []
    first_line: dict[str, int] = {}  # example id -> line number
    errors: list[tuple[int, DataError]] = []
    dropped = 0
    for number, line in read_lines(path):
        try:
            example = _parse_example(line, f"{path} line {number}", kb, first_line)
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
        _log_skipped(path, errors)
    if not examples and not dropped:
        raise DataError(f"{path}: no examples" + (f" ({len(errors)} bad lines skipped)" if errors else ""))
    return ExampleSet(tuple(examples), path, skipped=len(errors), dropped_unanswerable=dropped)


def _parse_example(line: bytes, where: str, kb: KnowledgeBase | None, first_line: dict[str, int]) -> Example:
    """Parse and check one example line; ``first_line`` maps the ids seen so far to their line numbers."""
    obj = parse_object(line, where)
    example_id = get_str(obj, "id", where, non_empty=True)
    if example_id in first_line:
        raise DataError(f'{where}: duplicate example id "{example_id}" (first at line {first_line[example_id]})')
    context = get_str_list(obj, "context", where)
    question = get_str(obj, "question", where, non_empty=True)
    answer = get_str(obj, "answer", where, non_empty=True)
    answers = get_str_list(obj, "answers", where, non_empty=True) if "answers" in obj else (answer,)
    gold_passage_ids = get_str_list(obj, "gold_passage_ids", where)
    if kb is not None:
        for pid in gold_passage_ids:
            if not kb.has(pid):
                raise DataError(f'{where}: gold passage id "{pid}" is not in the knowledge base {kb.path}')
    return Example(example_id, context, question, answer, answers, gold_passage_ids)


def _log_skipped(path: Path, errors: list[tuple[int, DataError]]) -> None:
    """Log one warning summarising the lines skipped under on_error="skip"."""
    numbers = ", ".join(str(number) for number, _ in errors[:SKIPPED_LINES_SHOWN])
    more = ", ..." if len(errors) > SKIPPED_LINES_SHOWN else ""
    first = errors[0][1]
    log.warning("%s: skipped %d bad lines (lines %s%s); first error: %s", path, len(errors), numbers, more, first)


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
