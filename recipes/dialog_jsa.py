"""JSA-RAG on DoQA cooking: MiniLM prior/posterior, SmolLM2-135M-Instruct generator (LoRA), before/after table.

Launch:  deepspeed recipes/dialog_jsa.py [key=value ...]
   or:   python recipes/dialog_jsa.py [--config recipes/dialog_rag.yaml] [key=value ...]
   GPU:  deepspeed --num_gpus 4 recipes/dialog_jsa.py train.max_steps=20000 deepspeed.config=zero3.json
"""
from pathlib import Path

from jsarag.cli import recipe_main

if __name__ == "__main__":
    recipe_main(default_config=Path(__file__).with_suffix(".yaml"))
