"""Recipes shipped with jsarag: ``jsarag train --config tiny_rag`` picks one by name; each script's header has its
launch command."""
