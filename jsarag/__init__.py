"""jsarag: end-to-end training of retrieval-augmented generation with the passage as a latent variable."""
from jsarag.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
