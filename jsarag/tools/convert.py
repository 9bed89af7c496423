"""``jsarag data convert``: common RAG data formats into the project's layout (passages.jsonl, <split>.jsonl).

    jsarag data convert FORMAT [NAME=]FILE ... OUT

``FORMAT`` is ``flashrag``, ``dpr`` (DPR and Atlas/FiD question files) or ``kilt``. Each input is ``NAME=FILE``:
``passages=FILE`` (repeatable) is a corpus; any other name is a split (``train=nq-train.jsonl``); a bare ``FILE``
is named by its file name up to the first dot. Inputs may be gzip-compressed (``.gz``). Fields read:

- flashrag: corpus lines ``{"id", "contents"}``, contents being "title\\ntext" (a title in double quotes, as in
  FlashRAG's Wikipedia dumps, loses them; no newline: untitled); question lines ``{"id", "question",
  "golden_answers": [...]}`` (no gold passages).
- dpr: corpus ``psgs_w100.tsv`` (``id``, ``text``, ``title`` columns, with a header) or JSONL ``{"id", "title",
  "text"}`` (Atlas); question files (a JSON list, as DPR's biencoder files, or JSON lines) ``{"question", "answers",
  "positive_ctxs", "negative_ctxs", "hard_negative_ctxs", "ctxs"}`` whose passages are ``{"passage_id" or "id",
  "title", "text"}``: every such passage joins the KB (one without an id is named by a hash of its title and text);
  the gold passages are ``positive_ctxs`` and the ``ctxs`` with ``has_answer: true``.
- kilt: the knowledge source's lines ``{"wikipedia_id", "wikipedia_title", "text": [paragraph, ...]}``, one passage
  per paragraph (``--kilt-passages paragraph``, id "<wikipedia_id>_<paragraph index>", the title paragraph 0
  left out) or per page (``page``, id "<wikipedia_id>"); task lines ``{"id", "input", "output": [{"answer",
  "provenance": [{"wikipedia_id", "start_paragraph_id", "end_paragraph_id"}]}]}``.

The first answer is the training target, all of them the references; lines without an answer are left out and
counted, and so are gold passage ids that name no written passage. The folder is written whole into a temporary
sibling and renamed into place, so OUT either holds a complete conversion or does not exist; it must not exist yet.
Every bad input line is a ``DataError`` naming the file and line.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from jsarag.data import get_str, get_str_list, is_file, parse_object, read_lines
from jsarag.errors import DataError, RecipeError
from jsarag.files import atomic_folder
from jsarag.paths import PLAIN_NAME

FORMATS = ("flashrag", "dpr", "kilt")
CORPUS = "passages"  # the input name of a corpus file
DPR_PASSAGE_LISTS = ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs", "ctxs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``jsarag data convert``."""
    parser.add_argument("format", choices=FORMATS, help="the input format")
    parser.add_argument("inputs", nargs="+", metavar="[NAME=]FILE",
                        help=f"{CORPUS}=FILE for a corpus (repeatable), SPLIT=FILE for a split's questions; a bare "
                             "FILE is named by its file name up to the first dot")
    parser.add_argument("out", type=Path, help="the data folder to write (must not exist)")
    parser.add_argument("--kilt-passages", choices=("paragraph", "page"), default="paragraph",
                        help="kilt: one passage per paragraph (default) or per Wikipedia page")
    parser.epilog = "Fields read per format: see the README's Data section or jsarag/tools/convert.py."


def main(args: argparse.Namespace) -> int:
    """Convert, write the folder and say what it holds."""
    corpora, splits = parse_inputs(args.inputs)
    summary = convert(args.format, corpora, splits, args.out, kilt_passages=args.kilt_passages)
    print(summary.describe(args.out))
    return 0


def parse_inputs(items: list[str]) -> tuple[list[Path], dict[str, Path]]:
    """``["passages=wiki.tsv", "train=nq.json", "dev.jsonl"]`` -> ([wiki.tsv], {"train": nq.json, "dev": dev.jsonl})."""
    corpora: list[Path] = []
    splits: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name.split(".")[0], item
        if not path:
            raise RecipeError(f"input {item!r}: write NAME=FILE, e.g. train=nq-train.jsonl")
        if name == CORPUS:
            corpora.append(Path(path))
        elif not PLAIN_NAME.fullmatch(name) or ".." in name:
            raise RecipeError(f"input {item!r}: {name!r} is not a split name (letters, digits, '_', '.', '-'); "
                              f"write SPLIT=FILE, or {CORPUS}=FILE for a corpus")
        elif name in splits:
            raise RecipeError(f"input {item!r}: split {name!r} is given twice ({splits[name]} and {path})")
        else:
            splits[name] = Path(path)
    if not splits:
        raise RecipeError("no split given: name at least one questions file, e.g. train=nq-train.jsonl")
    return corpora, splits


@dataclass
class Summary:
    """What a conversion wrote and left out."""

    passages: int = 0
    from_examples: int = 0  # passages that came with the examples (DPR contexts), not from a corpus
    examples: dict[str, int] = field(default_factory=dict)
    no_answer: dict[str, int] = field(default_factory=dict)  # lines left out for want of an answer
    missing_gold: int = 0  # gold passage ids that name no written passage, left out

    def describe(self, out: Path) -> str:
        """One line saying what the folder holds."""
        counts = ", ".join(f"{name} {n}" + (f" ({self.no_answer[name]} without an answer left out)"
                                             if self.no_answer.get(name) else "") for name, n in self.examples.items())
        extra = f" ({self.from_examples} of them from the examples' contexts)" if self.from_examples else ""
        missing = f"; {self.missing_gold} gold passage ids not in the passages left out" if self.missing_gold else ""
        return f"wrote {out}: {self.passages} passages{extra}; examples: {counts}{missing}"


def convert(fmt: str, corpora: list[Path], splits: dict[str, Path], out: Path, *,
            kilt_passages: str = "paragraph") -> Summary:
    """Convert the inputs of a format into the data folder ``out``, atomically; return what was written."""
    if fmt not in FORMATS:
        raise RecipeError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    for path in [*corpora, *splits.values()]:
        if not is_file(path):
            raise DataError(f"{path}: no such file")
    out = Path(out)
    if out.exists():
        raise DataError(f"{out}: exists already; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        summary = _convert_into(fmt, corpora, splits, tmp, kilt_passages)
    return summary


def _convert_into(fmt: str, corpora: list[Path], splits: dict[str, Path], folder: Path,
                  kilt_passages: str) -> Summary:
    summary = Summary()
    with (folder / "passages.jsonl").open("w", encoding="utf-8") as kb_file:
        kb = _PassageWriter(kb_file)
        for corpus in corpora:
            for where, passage_id, title, text in _corpus(fmt, corpus, kilt_passages):
                kb.add(passage_id, title, text, where, strict=True)
        from_corpora = kb.count
        pending: list[tuple[str, Path, Path]] = []
        for name, path in splits.items():
            split_file = folder / f"{name}.jsonl"
            with split_file.open("w", encoding="utf-8") as lines:
                kept, no_answer = 0, 0
                for where, example, gold in _examples(fmt, path, name, kb, kilt_passages):
                    if example is None:
                        no_answer += 1
                        continue
                    example["gold_passage_ids"] = gold  # checked once every passage is written (below)
                    lines.write(json.dumps(example, ensure_ascii=False) + "\n")
                    kept += 1
            summary.examples[name], summary.no_answer[name] = kept, no_answer
            pending.append((name, path, split_file))
    if not kb.count:
        raise DataError("no passages: give a corpus (passages=FILE)" + (" or questions with contexts" if fmt == "dpr"
                                                                        else ""))
    for _, _, split_file in pending:  # drop gold ids that name no passage (a KILT page outside the corpus, say)
        summary.missing_gold += _keep_known_gold(split_file, kb.ids)
    summary.passages, summary.from_examples = kb.count, kb.count - from_corpora
    return summary


class _PassageWriter:
    """Write passages as JSON lines, once per id; the set of ids (~100 bytes each) is kept to check gold ids."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.ids: set[str] = set()

    @property
    def count(self) -> int:
        return len(self.ids)

    def add(self, passage_id: str, title: str, text: str, where: str, *, strict: bool) -> None:
        """Write a passage; a repeated id is an error in a corpus (``strict``), skipped when it comes again."""
        if passage_id in self.ids:
            if strict:
                raise DataError(f'{where}: duplicate passage id "{passage_id}" (an earlier line has it)')
            return
        if not passage_id.strip():
            raise DataError(f"{where}: empty passage id")
        self.ids.add(passage_id)
        self.out.write(json.dumps({"id": passage_id, "title": title, "text": text}, ensure_ascii=False) + "\n")


def _keep_known_gold(split_file: Path, known: set[str]) -> int:
    """Rewrite a split file without gold ids that name no passage; return how many were dropped."""
    dropped = 0
    rewritten = split_file.with_name(split_file.name + ".part")
    with split_file.open(encoding="utf-8") as lines, rewritten.open("w", encoding="utf-8") as out:
        for line in lines:
            example = json.loads(line)
            gold = example["gold_passage_ids"]
            example["gold_passage_ids"] = [g for g in gold if g in known]
            dropped += len(gold) - len(example["gold_passage_ids"])
            out.write(json.dumps(example, ensure_ascii=False) + "\n")
    os.replace(rewritten, split_file)
    return dropped


# ---------------------------------------------------------------------------------------------------------------------
# Reading the inputs


def _objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("<file> line N" or "<file> item N", object) for a JSON-lines file or a file holding one JSON list."""
    if _first_byte(path) == b"[":  # DPR's biencoder files: one JSON list (read whole: json has no streaming reader)
        try:
            with _open_text(path) as stream:
                items = json.load(stream)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"{path}: not a readable JSON list ({err})") from None
        for number, item in enumerate(items):
            where = f"{path} item {number}"
            if not isinstance(item, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
            yield where, item
        return
    for number, line in read_lines(path):
        where = f"{path} line {number}"
        yield where, parse_object(line, where)


def _first_byte(path: Path) -> bytes:
    """The first non-blank byte of a (possibly gzip-compressed) file."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as stream:
            return stream.read(4096).lstrip()[:1]
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot be read ({err})") from None


def _open_text(path: Path) -> TextIO:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _corpus(fmt: str, path: Path, kilt_passages: str) -> Iterator[tuple[str, str, str, str]]:
    """Yield (where, id, title, text) for each passage of a corpus file."""
    if fmt == "dpr" and path.name.removesuffix(".gz").endswith(".tsv"):
        yield from _dpr_tsv(path)
        return
    for where, obj in _objects(path):
        if fmt == "flashrag":
            contents = get_str(obj, "contents", where)
            title, newline, text = contents.partition("\n")
            if not newline:
                title, text = "", contents
            elif len(title) >= 2 and title.startswith('"') and title.endswith('"'):
                title = title[1:-1]
            yield where, get_str(obj, "id", where, non_empty=True, numbers=True), title, text
        elif fmt == "dpr":
            yield where, get_str(obj, "id", where, non_empty=True, numbers=True), get_str(obj, "title", where), \
                get_str(obj, "text", where)
        else:
            yield from _kilt_page(obj, where, kilt_passages)


def _dpr_tsv(path: Path) -> Iterator[tuple[str, str, str, str]]:
    """Passages of DPR's psgs_w100.tsv: a header naming id, text and title, then one passage a row."""
    try:
        with _open_text(path) as stream:
            rows = csv.reader(stream, delimiter="\t")
            header = next(rows, None)
            if header is None or not {"id", "text", "title"} <= set(header):
                raise DataError(f"{path} line 1: expected a header with the columns id, text, title; got {header}")
            columns = [header.index(name) for name in ("id", "title", "text")]
            for row in rows:
                where = f"{path} line {rows.line_num}"
                if len(row) != len(header):
                    raise DataError(f"{where}: {len(row)} columns, the header has {len(header)}")
                passage_id, title, text = (row[i] for i in columns)
                if not passage_id.strip():
                    raise DataError(f"{where}: empty passage id")
                yield where, passage_id, title, text
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot be read ({err})") from None


def _kilt_page(obj: dict[str, Any], where: str, granularity: str) -> Iterator[tuple[str, str, str, str]]:
    """The passages of one KILT knowledge-source page: its paragraphs, or the whole page."""
    page_id = get_str(obj, "wikipedia_id", where, non_empty=True, numbers=True)
    title = get_str(obj, "wikipedia_title", where)
    paragraphs = get_str_list(obj, "text", where)
    first = 1 if paragraphs and paragraphs[0].strip() == title.strip() else 0  # paragraph 0 repeats the title
    if granularity == "page":
        yield where, page_id, title, " ".join(p.strip() for p in paragraphs[first:] if p.strip())
        return
    for index in range(first, len(paragraphs)):
        if paragraphs[index].strip():
            yield where, f"{page_id}_{index}", title, paragraphs[index].strip()


def _examples(fmt: str, path: Path, split: str, kb: _PassageWriter,
              kilt_passages: str) -> Iterator[tuple[str, dict[str, Any] | None, list[str]]]:
    """Yield (where, example or None when it has no answer, gold passage ids) for each line of a questions file."""
    seen: set[str] = set()
    for number, (where, obj) in enumerate(_objects(path)):
        if fmt == "flashrag":
            answers = get_str_list(obj, "golden_answers", where)
            question = get_str(obj, "question", where, non_empty=True)
            example_id = get_str(obj, "id", where, numbers=True) if "id" in obj else f"{split}-{number}"
            gold: list[str] = []
        elif fmt == "dpr":
            question = get_str(obj, "question", where, non_empty=True)
            answers = get_str_list(obj, "answers", where)
            example_id = get_str(obj, "id", where, numbers=True) if "id" in obj else f"{split}-{number}"
            gold = _dpr_contexts(obj, where, kb)
        else:
            question = get_str(obj, "input", where, non_empty=True)
            example_id = get_str(obj, "id", where, non_empty=True, numbers=True)
            answers, gold = _kilt_output(obj, where, kilt_passages)
        if example_id in seen:
            raise DataError(f'{where}: duplicate example id "{example_id}"')
        seen.add(example_id)
        answers = [a for a in dict.fromkeys(answers) if a.strip()]
        if not answers:
            yield where, None, []
            continue
        yield where, {"id": example_id, "context": [], "question": question, "answer": answers[0],
                      "answers": answers}, gold


def _dpr_contexts(obj: dict[str, Any], where: str, kb: _PassageWriter) -> list[str]:
    """Write a DPR line's passages into the KB; return the gold ones' ids (positive_ctxs, ctxs with has_answer)."""
    gold: list[str] = []
    for key in DPR_PASSAGE_LISTS:
        contexts = obj.get(key, [])
        if not isinstance(contexts, list):
            raise DataError(f'{where}: field "{key}" must be a list of passages')
        for i, ctx in enumerate(contexts):
            at = f"{where}, {key}[{i}]"
            if not isinstance(ctx, dict):
                raise DataError(f"{at}: expected a passage object")
            title, text = get_str(ctx, "title", at), get_str(ctx, "text", at)
            id_key = "passage_id" if "passage_id" in ctx else "id"
            passage_id = get_str(ctx, id_key, at, non_empty=True, numbers=True) if id_key in ctx else \
                "h" + hashlib.blake2b(json.dumps([title, text]).encode(), digest_size=8).hexdigest()
            kb.add(passage_id, title, text, at, strict=False)
            if key == "positive_ctxs" or (key == "ctxs" and ctx.get("has_answer") is True):
                gold.append(passage_id)
    return list(dict.fromkeys(gold))


def _kilt_output(obj: dict[str, Any], where: str, granularity: str) -> tuple[list[str], list[str]]:
    """The answers and gold passage ids of a KILT task line (provenance: pages or paragraph ranges)."""
    outputs = obj.get("output", [])
    if not isinstance(outputs, list):
        raise DataError(f'{where}: field "output" must be a list')
    answers, gold = [], []
    for i, output in enumerate(outputs):
        at = f"{where}, output[{i}]"
        if not isinstance(output, dict):
            raise DataError(f"{at}: expected an object")
        if "answer" in output:
            answers.append(get_str(output, "answer", at))
        provenance = output.get("provenance", [])
        if not isinstance(provenance, list):
            raise DataError(f'{at}: field "provenance" must be a list')
        for j, source in enumerate(provenance):
            here = f"{at}.provenance[{j}]"
            if not isinstance(source, dict):
                raise DataError(f"{here}: expected an object")
            page = get_str(source, "wikipedia_id", here, non_empty=True, numbers=True)
            if granularity == "page":
                gold.append(page)
                continue
            start = source.get("start_paragraph_id")
            end = source.get("end_paragraph_id", start)
            if isinstance(start, int) and isinstance(end, int) and 0 <= start <= end:
                gold.extend(f"{page}_{p}" for p in range(start, end + 1))
    return answers, list(dict.fromkeys(gold))
