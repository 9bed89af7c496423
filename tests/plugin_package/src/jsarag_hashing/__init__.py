"""An example third-party jsarag plugin (see plugin.py)."""
