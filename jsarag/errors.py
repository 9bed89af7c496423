"""The project's own error types: every failure a user can cause is one of these, with a message that names
the file, line or key at fault and what to do about it."""
from __future__ import annotations


class JsaragError(Exception):
    """Base class of every error jsarag raises on bad input or a failed run."""

    every_rank: bool = False  # raised alike on every rank after they agreed: rank 0 alone prints it


class RecipeError(JsaragError):
    """A recipe (YAML or command-line override) is malformed, unknown or mistyped."""


class PluginError(JsaragError):
    """A plugin is unknown, failed to load, or raised inside a hook."""


class DataError(JsaragError):
    """A dataset or knowledge-base file is malformed or inconsistent."""


class ModelError(JsaragError):
    """A model name could not be resolved to weights, or a model is unusable."""


class IndexMismatchError(JsaragError):
    """A saved index was built for another knowledge base, encoder or index type."""


class TrainingError(JsaragError):
    """Training cannot go on (too many non-finite losses in a row, an unreadable checkpoint)."""


class Interrupted(JsaragError):
    """Training stopped on SIGINT or SIGTERM; ``code`` is the exit code (128 + the signal's number)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
