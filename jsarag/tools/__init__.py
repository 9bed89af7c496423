"""Commands built on jsarag's public APIs (``jsarag.api``, ``jsarag.run``, ``jsarag.loop``, ``jsarag.recipe``):
benchmarks, gradient diagnostics, data tools, run comparison, index inspection."""
