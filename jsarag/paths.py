"""Where a recipe may make the run write: inside ``output_dir``, unless the user wrote an absolute path.

A recipe is a file people share and download; a relative path in it must not reach outside the run's own folder
(``index.dir: ../../.ssh``). Absolute paths are taken as the user's explicit choice. Names that become file names
(split names: ``predictions/<split>-stepN.jsonl``) must be plain names.

The checks raise ``PathRefused``, a ``RecipeError`` that is also a ``ValueError``, so that inside a pydantic
validator it becomes a validation error reported by key, file and line.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePath

from jsarag.errors import RecipeError

PLAIN_NAME = re.compile(r"\w[\w.-]*")  # a split name: letters, digits, _ . -, not starting with . or -


class PathRefused(RecipeError, ValueError):
    """A recipe path that climbs out of output_dir, or a name that is not a plain file name."""


def climbs(path: PurePath) -> bool:
    """Whether a path is relative and goes up with '..'."""
    return not path.is_absolute() and ".." in path.parts


def stays_inside(value: str | PurePath) -> Path:
    """Return a recipe path unchanged, refusing a relative one that climbs with '..'."""
    path = Path(value)
    if climbs(path):
        raise PathRefused(f"the relative path '{value}' climbs out with '..'; a run writes only inside its "
                          "output_dir unless you give an absolute path")
    return path


def confined(value: str | PurePath, base: Path, key: str) -> Path:
    """Return a path a recipe key writes to: absolute as given, relative resolved under ``base``, never climbing out."""
    path = Path(value).expanduser() if str(value).startswith("~") else Path(value)
    if path.is_absolute():
        return path
    if climbs(path):
        raise PathRefused(f"{key}: the relative path '{value}' climbs out of {base} with '..'; a run writes only "
                          "inside its output_dir unless you give an absolute path")
    return base / path


def plain_name(value: str) -> str:
    """Return a name that becomes part of a file name, refusing '/', '..' and other characters."""
    if not PLAIN_NAME.fullmatch(value) or ".." in value:
        raise PathRefused(f"'{value}' is not a plain name (letters, digits, '_', '.', '-'; no '/' or '..'): it "
                          "names files the run writes")
    return value
