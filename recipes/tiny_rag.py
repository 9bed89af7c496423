"""Vanilla RAG on DoQA cooking with a tiny generator, in a couple of minutes on CPU.

Launch:  deepspeed --num_gpus 1 recipes/tiny_rag.py [key=value ...]
   or:   python recipes/tiny_rag.py [--config other.yaml] [key=value ...]
"""
from pathlib import Path

from jsarag.cli import recipe_main

if __name__ == "__main__":
    recipe_main(default_config=Path(__file__).with_suffix(".yaml"))
