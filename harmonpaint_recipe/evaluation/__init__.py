"""Evaluation harness behind ``attnctl eval`` and ``attnctl ablate``.

- :mod:`.items` - the ``items.jsonl`` manifest.
- :mod:`.methods` - what is evaluated (a recipe with overrides, or precomputed outputs).
- :mod:`.store` - the output folder layout and atomic per-item records.
- :mod:`.sharding` - splitting items across ``accelerate`` processes.
- :mod:`.runner` - the resumable generate -> score -> summarize loop.
- :mod:`.tables`, :mod:`.grids` - summary CSV/Markdown and comparison PNGs.
- :mod:`.ablation` - Table III variants derived from a recipe's strategies.
"""
