"""jsarag: end-to-end training of retrieval-augmented generation with the passage as a latent variable.

Plugin authors import from ``jsarag.api``; ``jsarag.hookimpl`` is the same marker as ``jsarag.api.hookimpl``.
"""
from typing import Any

__all__ = ["hookimpl"]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    """``hookimpl`` comes from ``jsarag.api``, imported on first use (it loads torch)."""
    if name == "hookimpl":
        from jsarag.api import hookimpl

        return hookimpl
    raise AttributeError(f"module 'jsarag' has no attribute {name!r}")
