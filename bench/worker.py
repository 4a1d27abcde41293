"""One side of one figure in its own process, so that its peak memory is its own:

    python -m bench.worker SPEC.json OUT.json

SPEC.json holds {"figure": ..., ...the figure's settings}; OUT.json receives the figure's result.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

FIGURES = {"matmul": ("bench.matmul", "run"), "training": ("bench.training", "run"),
           "eval_model": ("bench.generation", "train_eval_model"), "generation": ("bench.generation", "run"),
           "preprocessing": ("bench.preprocessing", "run")}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    module_name, function = FIGURES[spec["figure"]]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    from bench.common import vm_hwm_mib

    result = getattr(importlib.import_module(module_name), function)(spec)
    result["self_peak_rss_mib"] = vm_hwm_mib()
    Path(argv[1]).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
