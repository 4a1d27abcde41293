"""This machine's matmul peak: torch.matmul of large squares, fp32 and bf16. The best single multiply over a few
seconds counts, not the mean: the figure is a ceiling, and on a shared machine the mean measures the neighbours."""

from __future__ import annotations

import time
from typing import Any

import torch


def peak(dtype_name: str, size: int, seconds: float, device: str = "cpu") -> dict[str, Any]:
    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best, runs, start = float("inf"), 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
        runs += 1
    return {"dtype": dtype_name, "size": size, "runs": runs, "best_s": best, "gflops": 2 * size**3 / best / 1e9}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    for dtype in ("float32", "bfloat16"):
        results = []
        for size in sorted(spec["sizes"]):
            results.append(peak(dtype, size, spec["seconds"]))
            if results[-1]["best_s"] > spec["seconds"] / 2:
                break  # a CPU without native bf16: the next size would take 8x as long for no better figure
        top = max(results, key=lambda r: r["gflops"])
        out[dtype] = {"gflops": top["gflops"], "size": top["size"], "all": results}
    return out
