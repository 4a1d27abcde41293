"""`python -m bench.worker SPEC.json OUT.json`: one side of one figure in its own process, so that its peak memory
is its own. SPEC.json holds {"figure": ..., ...its settings}; OUT.json receives the figure's result."""

import importlib
import json
import sys
import warnings
from pathlib import Path

from bench.common import vm_hwm_mib

FIGURES = {"model": "bench.prepare:model_dir", "matmul": "bench.matmul:run", "training": "bench.training:run",
           "preprocessing": "bench.preprocessing:run", "eval_model": "bench.generation:train_eval_model",
           "generation": "bench.generation:run"}

if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    spec = json.loads(Path(sys.argv[1]).read_text())
    module, function = FIGURES[spec["figure"]].split(":")
    result = getattr(importlib.import_module(module), function)(spec)
    result["self_peak_rss_mib"] = vm_hwm_mib()
    Path(sys.argv[2]).write_text(json.dumps(result, indent=1, ensure_ascii=False))
