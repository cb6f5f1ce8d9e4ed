"""The measuring parts of ``attnctl gpu-check``, each run in a process of its own.

``python -m harmonpaint_recipe.bench.gpu_parts KIND --settings JSON --result PATH`` runs one
part and writes its result record (JSON) to ``PATH``; progress goes to stdout. ``KIND`` is

- ``parity``: ``bench.parity.run_parity`` (settings: ``ParityConfig`` fields);
- ``bench``: ``bench.harness.run_benchmark`` (settings: ``BenchConfig`` fields), with or
  without ``compile``.

A process per part gives each one a fresh GPU (peak memory is not inflated by what an
earlier part left in the caching allocator), its own dynamo counters, and lets the suite
stop a part that overruns its time without losing the others.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

PART_KINDS: tuple[str, ...] = ("parity", "bench")


def run_part(kind: str, settings: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one part in this process and return its result record."""
    if kind == "parity":
        from harmonpaint_recipe.bench.parity import ParityConfig, run_parity

        cfg = ParityConfig(**{**settings, "recipes": tuple(settings.get("recipes", ParityConfig.recipes)),
                              "dtypes": tuple(settings.get("dtypes", ParityConfig.dtypes))})
        return run_parity(cfg, log=log)
    if kind == "bench":
        from harmonpaint_recipe.bench.harness import BenchConfig, run_benchmark
        from harmonpaint_recipe.bench.variants import parse_variants

        cfg = BenchConfig(**{**settings, "variants": parse_variants(",".join(settings.get("variants", ["all"])))})
        result = run_benchmark(cfg, log=log)
        if cfg.compile:
            # inductor's Triton launchers are built with the host C compiler; say which one was there
            result["meta"]["c_compiler"] = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        return result
    raise ValueError(f"unknown part kind '{kind}'; expected one of {', '.join(PART_KINDS)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the part processes (``--result`` receives the JSON record)."""
    parser = argparse.ArgumentParser(prog="python -m harmonpaint_recipe.bench.gpu_parts",
                                     description="Run one part of attnctl gpu-check.")
    parser.add_argument("kind", choices=PART_KINDS)
    parser.add_argument("--settings", required=True, help="JSON object of the part's settings")
    parser.add_argument("--result", required=True, help="file to write the result record to")
    args = parser.parse_args(argv)

    from diffusers.utils import logging as diffusers_logging

    # per-build cast warnings would drown the progress lines in the suite log
    diffusers_logging.set_verbosity_error()
    result = run_part(args.kind, json.loads(args.settings), log=lambda line: print(line, flush=True))
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
