"""The CPU bench: every figure beside its baseline, in one run, each side in its own process.

    python bench/run.py                 # all figures (~6 min on a quiet 2-core machine); what `make bench` runs
    python bench/run.py --quick         # small sizes, to check the harness (~2 min); results not for quoting
    python bench/run.py --only training_mid,generation
    python bench/run.py --table bench/results/NAME.json      # print the table of a saved run (markdown)

Writes bench/results/<cpu-model>-<cores>c.json (machine, versions, settings, every figure, ratios, goals, notes)
and prints a short table. What each side does and how figures are counted: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import advertisegen  # noqa: E402
from bench.training import SIDES as TRAINING_SIDES  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS_DIR, ROOT, SCHEMA, check_goals, combine_rounds, compute_ratios, format_table, goal_summary,
    machine_info, now_iso, package_versions, ratio, results_name, run_measured, validate_results,
)

FIGURES = ("matmul", "startup", "preprocessing", "training_tiny", "training_mid", "generation")

SETTINGS = {
    "seed": 42,
    "method": "sft",  # the quickstart's method on the random tiny model; FLOPs are then 6·N per token
    "max_input_length": 64,
    "max_output_length": 128,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "training": {"tiny": {"steps": 100, "warmup_steps": 5}, "mid": {"steps": 30, "warmup_steps": 4}},
    # each side runs this many times, alternating sides; see bench.common.combine_rounds
    "training_rounds": {"tiny": 3, "mid": 2},
    # eval_batch_size 16: the reference's per_device_eval_batch_size and glm-ft's default alike
    "eval": {"train_rows": 2400, "train_steps": 300, "train_batch_size": 8, "prompts": 256, "eval_batch_size": 16,
             "max_new_tokens": 128, "larger_eval_batch_size": 64},
    "preprocessing": {"rows": 100_000, "num_proc": 16},
    "startup": {"repeats": 5},
    "matmul": {"sizes": [1024, 2048, 4096], "seconds": 1.5},
}

QUICK = {
    "training": {"tiny": {"steps": 12, "warmup_steps": 2}, "mid": {"steps": 8, "warmup_steps": 2}},
    "training_rounds": {"tiny": 1, "mid": 1},
    "eval": {"train_rows": 400, "train_steps": 50, "train_batch_size": 8, "prompts": 16, "eval_batch_size": 8,
             "max_new_tokens": 32, "larger_eval_batch_size": 16},
    "preprocessing": {"rows": 5_000, "num_proc": 16},
    "startup": {"repeats": 2},
    "matmul": {"sizes": [512], "seconds": 0.5},
}

CHILD_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONWARNINGS": "ignore",
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, settings: dict[str, Any], work: Path):
        self.settings = settings
        self.work = work
        self.env = {**os.environ, **CHILD_ENV, "HF_DATASETS_CACHE": str(work / "hf-datasets")}
        self.env.pop("HYDRA_FULL_ERROR", None)
        self.figures: dict[str, Any] = {}
        self._specs = 0

    # --- running one side --------------------------------------------------------------------------------------

    def side(self, spec: dict[str, Any], timeout: float = 900, tree: bool = False) -> dict[str, Any]:
        """Run one side of a figure in its own process; its result plus peak RSS and process wall time (and, with
        `tree`, the peak PSS of the process with its workers)."""
        self._specs += 1
        spec_path = self.work / f"spec-{self._specs}.json"
        out_path = self.work / f"out-{self._specs}.json"
        spec_path.write_text(json.dumps(spec))
        run = run_measured([sys.executable, "-m", "bench.worker", str(spec_path), str(out_path)], cwd=ROOT,
                           env=self.env, timeout=timeout, tree=tree)
        if run["returncode"] != 0 or not out_path.is_file():
            tail = (run["stderr"] or run["stdout"]).strip().splitlines()[-15:]
            log(f"{spec['figure']} {spec.get('side', '')} failed (exit {run['returncode']}):\n  " + "\n  ".join(tail))
            return {"error": "\n".join(tail), "peak_rss_mib": run["peak_rss_mib"], "process_wall_s": run["wall_s"]}
        result = json.loads(out_path.read_text())
        # The worker's own VmHWM, read as its last act, can't miss a late peak the way sampling can.
        peak = max(filter(None, [result.pop("self_peak_rss_mib", None), run["peak_rss_mib"]]), default=None)
        result.update(peak_rss_mib=peak, process_wall_s=round(run["wall_s"], 2))
        if tree:
            result.update(peak_tree_pss_mib=run["peak_tree_pss_mib"], max_processes=run["max_processes"])
        return result

    # --- figures -----------------------------------------------------------------------------------------------

    def matmul(self) -> dict[str, Any]:
        """Measured first and again last (`matmul_again`): the higher of the two runs is the peak."""
        result = self.side({"figure": "matmul", **self.settings["matmul"]})
        result["gflops_each_run"] = {d: [result[d]["gflops"]] for d in ("float32", "bfloat16") if d in result}
        return {"sides": {"measured": result}}

    def matmul_again(self) -> None:
        again = self.side({"figure": "matmul", **self.settings["matmul"]})
        measured = self.figures["matmul"]["sides"]["measured"]
        measured["peak_rss_mib"] = max(measured["peak_rss_mib"], again["peak_rss_mib"])
        for dtype in ("float32", "bfloat16"):
            if dtype not in again:
                continue
            measured.setdefault("gflops_each_run", {}).setdefault(dtype, []).append(again[dtype]["gflops"])
            if again[dtype]["gflops"] > measured.get(dtype, {}).get("gflops", 0):
                measured[dtype] = again[dtype]

    def startup(self) -> dict[str, Any]:
        py = sys.executable
        commands = {
            "python": [py, "-c", "pass"],
            "import_torch_transformers": [py, "-c", "import torch, transformers"],
            "train_help": [py, "train.py", "--help"],
            "dry_run": [py, "train.py", "experiment=quickstart", "dry_run=true",
                        f"hydra.run.dir={self.work / 'dry-run'}"],
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
        for _ in range(self.settings["startup"]["repeats"]):
            for name, cmd in commands.items():  # interleaved, so a busy spell hits every command alike
                run = run_measured(cmd, cwd=ROOT, env=self.env, timeout=120)
                if run["returncode"] != 0:
                    log(f"startup {name} failed: {run['stderr'][-500:]}")
                runs[name].append(run)
        sides = {}
        for name, done in runs.items():
            ok = [r for r in done if r["returncode"] == 0]
            sides[name] = {
                "command": " ".join(Path(c).name if c == py else c for c in commands[name]),
                "wall_s_median": statistics.median(r["wall_s"] for r in ok) if ok else None,
                "wall_s_all": [round(r["wall_s"], 3) for r in done],
                "peak_rss_mib": max((r["peak_rss_mib"] for r in ok if r["peak_rss_mib"] is not None), default=None),
                "failures": len(done) - len(ok),
            }
        return {"sides": sides, "baseline_is": "import_torch_transformers: what any training start-up pays"}

    def preprocessing(self) -> dict[str, Any]:
        cfg = self.settings["preprocessing"]
        data = self.work / "data-prep"
        advertisegen.write(data / "train.json", cfg["rows"], seed=4)
        base = self._spec("preprocessing", data, num_proc=cfg["num_proc"])
        sides = {side: self.side({**base, "side": side}, tree=True) for side in ("baseline", "glm_ft")}
        glm = sides["glm_ft"]
        if "warm_rows_per_s" in glm:
            sides["glm_ft_warm"] = {"rows_per_s": glm["warm_rows_per_s"], "seconds": glm["warm_seconds"],
                                    "peak_rss_mib": glm["peak_rss_mib"]}
        digests = {s: v.get("samples_sha256_16") for s, v in sides.items() if "samples_sha256_16" in v}
        return {"sides": sides, "rows": cfg["rows"], "same_samples": len(set(digests.values())) == 1,
                "samples_sha256_16": digests}

    def training(self, size: str) -> dict[str, Any]:
        cfg = self.settings["training"][size]
        rows = cfg["steps"] * self.settings["batch_size"]
        data = self.work / f"data-train-{size}"
        advertisegen.write(data / "train.json", rows, seed=1)
        base = self._spec("training", data, size=size, model_dir=str(self._model_dir(size)), **cfg)
        order = self.settings.get("training_sides") or list(TRAINING_SIDES)
        rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in order}
        for r in range(self.settings["training_rounds"][size]):
            for side in order if r % 2 == 0 else reversed(order):
                log(f"training {size} {side} (round {r + 1})")
                rounds[side].append(self.side({**base, "side": side}))
        sides = {}
        for side, done in rounds.items():
            ok = [d for d in done if "step_s" in d]
            first = dict(ok[0] if ok else done[-1])
            for key in ("step_s", "step_tokens", "step_samples", "step_flops", "timed_s", "tokens_per_s",
                        "samples_per_s", "steps_per_s", "model_flops_per_s"):
                first.pop(key, None)
            sides[side] = {**first, **combine_rounds(ok), "peak_rss_mib": max(d["peak_rss_mib"] for d in done),
                           "timed_cpu_s_each_round": [round(d.get("timed_cpu_s", 0), 2) for d in ok],
                           "errors": [d["error"] for d in done if "error" in d]}
        per_sample = {side: v.pop("per_sample_loss", None) for side, v in sides.items()}
        fp32 = [v.get("initial_loss_over_set") for v in sides.values() if not v.get("bf16")]
        bf16 = [v.get("initial_loss_over_set") for v in sides.values() if v.get("bf16")]
        return {
            "sides": sides,
            "samples": rows,
            "same_weights": len({v.get("weights_sha256_16") for v in sides.values()}) == 1,
            # fp32 sides must agree to rounding; bf16 autocast moves the loss by bf16's precision (~1e-3 relative)
            "same_initial_loss": same_value(fp32, 1e-4),
            "same_initial_loss_bf16": same_value(fp32 + bf16, 1e-2) if bf16 else None,
            # each sample's own loss, packed or not, against the baseline's (the samples are keyed by their tokens)
            "per_sample_loss_max_rel_diff": {
                side: per_sample_difference(per_sample["baseline"], losses)
                for side, losses in per_sample.items() if side != "baseline" and not sides[side].get("bf16")},
        }

    def generation(self) -> dict[str, Any]:
        cfg = self.settings["eval"]
        data = self.work / "data-eval"
        advertisegen.write(data / "train.json", cfg["train_rows"], seed=2)
        advertisegen.write(data / "test.json", cfg["prompts"], seed=3)
        base = self._spec("generation", data, model_dir=str(self._model_dir("tiny")), train_rows=cfg["train_rows"],
                          eval_batch_size=cfg["eval_batch_size"], max_new_tokens=cfg["max_new_tokens"],
                          train_steps=cfg["train_steps"], train_batch_size=cfg["train_batch_size"])
        out_dir = eval_model_cache(base)
        if (out_dir / "eval_model.json").is_file():
            trained = {**json.loads((out_dir / "eval_model.json").read_text()), "cached": True}
            log(f"generation: reusing the fine-tuned tiny model in {out_dir.relative_to(ROOT)}")
        else:
            log("generation: fine-tuning the tiny model both sides will evaluate (cached for later runs)")
            staging = self.work / "eval-model"
            trained = self.side({**base, "figure": "eval_model", "out_dir": str(staging)})
            if "error" in trained:
                return {"sides": {}, "eval_model": trained}
            (staging / "eval_model.json").write_text(json.dumps(trained, indent=1))
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            shutil.move(str(staging), str(out_dir))
            for stale in out_dir.parent.glob("eval-model-*"):  # models of older code or settings
                if stale != out_dir:
                    shutil.rmtree(stale, ignore_errors=True)
        spec = {**base, "model_dir": str(out_dir)}
        sides = {}
        variants = {"baseline": {}, "glm_ft": {},
                    # a setting either side could change; shown for how decoding on this CPU scales with batch size
                    "glm_ft_larger_batch": {"side": "glm_ft", "eval_batch_size": cfg["larger_eval_batch_size"]},
                    # finished rows leave the batch (glm_ft/train/generation.py), so one batch of every prompt
                    # wastes no decode slot on rows that stopped
                    "glm_ft_whole_set": {"side": "glm_ft", "eval_batch_size": cfg["prompts"]}}
        for name, extra in variants.items():
            log(f"generation {name}")
            sides[name] = self.side({**spec, "side": name, **extra})
        reference = sides["baseline"].get("predictions")
        same = {}
        for name, v in sides.items():
            preds = v.pop("predictions", None)
            if reference is not None and preds is not None and name != "baseline":
                same[name] = sum(a == b for a, b in zip(reference, preds))
        return {"sides": sides, "eval_model": trained, "outputs_equal_to_baseline": same,
                "outputs": cfg["prompts"]}

    # --- helpers -----------------------------------------------------------------------------------------------

    def _spec(self, figure: str, data: Path, **extra: Any) -> dict[str, Any]:
        s = self.settings
        return {"figure": figure, "data_dir": str(data), "work_dir": str(self.work), "seed": s["seed"],
                "method": s["method"], "max_input_length": s["max_input_length"],
                "max_output_length": s["max_output_length"], "batch_size": s["batch_size"],
                "learning_rate": s["learning_rate"], **extra}

    def _model_dir(self, size: str) -> Path:
        # Built in a child process: the orchestrator itself never imports torch.
        out = self.work / f"{size}-model-path.txt"
        if not out.is_file():
            code = ("import sys; from pathlib import Path; from bench.prepare import model_dir; "
                    f"Path({str(out)!r}).write_text(str(model_dir({size!r}, Path({str(self.work)!r}))))")
            run = run_measured([sys.executable, "-c", code], cwd=ROOT, env=self.env, timeout=600)
            if run["returncode"] != 0:
                raise RuntimeError(f"building the {size} model failed:\n{run['stderr'][-2000:]}")
        return Path(out.read_text())


def same_value(values: list[float | None], relative: float) -> bool:
    known = [v for v in values if v is not None]
    return bool(known) and len(known) == len(values) and max(known) - min(known) <= relative * max(known)


def per_sample_difference(base: dict[str, float] | None, other: dict[str, float] | None) -> float | None:
    """Largest relative difference between two sides' per-sample losses; inf if they hold different samples."""
    if not base or not other:
        return None
    if set(base) != set(other):
        return float("inf")
    return max(abs(other[k] - v) / max(abs(v), 1e-12) for k, v in base.items())


def eval_model_cache(spec: dict[str, Any]) -> Path:
    """Where the fine-tuned tiny model of the generation figure is kept between runs: keyed by everything that
    decides its weights (settings, the data generator, the model, data and training code), so a change retrains."""
    import hashlib

    digest = hashlib.sha256(json.dumps({k: v for k, v in spec.items() if k not in ("work_dir", "data_dir",
                                                                                   "model_dir")},
                                       sort_keys=True).encode())
    for path in ("bench/advertisegen.py", "bench/generation.py", "scripts/make_sample_data.py", "glm_ft/data/dataset.py",
                 "glm_ft/model.py", "glm_ft/chatglm3/modeling.py", "glm_ft/chatglm3/tiny.py",
                 "glm_ft/chatglm3/assets/tiny_tokenizer.model"):
        digest.update((ROOT / path).read_bytes())
    return ROOT / ".cache" / "bench" / f"eval-model-{digest.hexdigest()[:16]}"


# --- assembling the results -----------------------------------------------------------------------------------

RATIO_SOURCES = {
    "training_tiny_tokens_per_s": ("training_tiny", "tokens_per_s", "glm_ft", "baseline"),
    "training_tiny_grouped_tokens_per_s": ("training_tiny", "tokens_per_s", "glm_ft_grouped", "baseline"),
    "training_tiny_samples_per_s": ("training_tiny", "samples_per_s", "glm_ft", "baseline"),
    "training_mid_tokens_per_s": ("training_mid", "tokens_per_s", "glm_ft", "baseline"),
    "training_mid_grouped_tokens_per_s": ("training_mid", "tokens_per_s", "glm_ft_grouped", "baseline"),
    "training_mid_samples_per_s": ("training_mid", "samples_per_s", "glm_ft", "baseline"),
    "training_tiny_packed_tokens_per_s": ("training_tiny", "tokens_per_s", "glm_ft_packed", "baseline"),
    "training_mid_packed_tokens_per_s": ("training_mid", "tokens_per_s", "glm_ft_packed", "baseline"),
    "training_tiny_grouped_bf16_tokens_per_s": ("training_tiny", "tokens_per_s", "glm_ft_grouped_bf16", "baseline"),
    "training_mid_grouped_bf16_tokens_per_s": ("training_mid", "tokens_per_s", "glm_ft_grouped_bf16", "baseline"),
    "eval_generated_tokens_per_s": ("generation", "generated_tokens_per_s", "glm_ft", "baseline"),
    "eval_larger_batch_generated_tokens_per_s": ("generation", "generated_tokens_per_s", "glm_ft_larger_batch",
                                                 "baseline"),
    "eval_whole_set_generated_tokens_per_s": ("generation", "generated_tokens_per_s", "glm_ft_whole_set",
                                              "baseline"),
    "preprocessing_rows_per_s": ("preprocessing", "rows_per_s", "glm_ft", "baseline"),
    "preprocessing_warm_rows_per_s": ("preprocessing", "rows_per_s", "glm_ft_warm", "baseline"),
    # times: baseline / glm-ft, so that > 1 means glm-ft is faster
    "dry_run_vs_import_torch_transformers": ("startup", "wall_s_median", "import_torch_transformers", "dry_run"),
    "train_help_vs_import_torch_transformers": ("startup", "wall_s_median", "import_torch_transformers",
                                                "train_help"),
}


def _get(figures: dict, figure: str, side: str, key: str) -> Any:
    return figures.get(figure, {}).get("sides", {}).get(side, {}).get(key)


def add_mfu(figures: dict[str, Any]) -> None:
    """Model FLOP/s of training as a fraction of the measured matmul peaks (fp32 and bf16)."""
    peak = figures.get("matmul", {}).get("sides", {}).get("measured", {})
    for size in ("tiny", "mid"):
        for side in figures.get(f"training_{size}", {}).get("sides", {}).values():
            for dtype in ("float32", "bfloat16"):
                gflops = peak.get(dtype, {}).get("gflops")
                flops = side.get("model_flops_per_s")
                side[f"mfu_{dtype}"] = flops / (gflops * 1e9) if flops and gflops else None


def table(figures: dict[str, Any], ratios: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def add(figure, unit, base, glm, speedup):
        rows.append({"figure": figure, "unit": unit, "baseline": base, "glm_ft": glm, "ratio": speedup})

    for size in ("tiny", "mid"):
        f = f"training_{size}"
        if f not in figures:
            continue
        add(f"training tokens/s, {size}", "tokens/s", _get(figures, f, "baseline", "tokens_per_s"),
            _get(figures, f, "glm_ft", "tokens_per_s"), ratios.get(f"{f}_tokens_per_s"))
        add(f"training tokens/s, {size}, group_by_length=true", "tokens/s",
            _get(figures, f, "baseline", "tokens_per_s"), _get(figures, f, "glm_ft_grouped", "tokens_per_s"),
            ratios.get(f"{f}_grouped_tokens_per_s"))
        add(f"training tokens/s, {size}, group_by_length=true bf16=true", "tokens/s",
            _get(figures, f, "baseline", "tokens_per_s"), _get(figures, f, "glm_ft_grouped_bf16", "tokens_per_s"),
            ratios.get(f"{f}_grouped_bf16_tokens_per_s"))
        add(f"training tokens/s, {size}, data.packing=true", "tokens/s",
            _get(figures, f, "baseline", "tokens_per_s"), _get(figures, f, "glm_ft_packed", "tokens_per_s"),
            ratios.get(f"{f}_packed_tokens_per_s"))
        add(f"training samples/s, {size}", "samples/s", _get(figures, f, "baseline", "samples_per_s"),
            _get(figures, f, "glm_ft", "samples_per_s"), ratios.get(f"{f}_samples_per_s"))
        add(f"training loss over the set (same work), {size}", "loss",
            _get(figures, f, "baseline", "initial_loss_over_set"), _get(figures, f, "glm_ft", "initial_loss_over_set"),
            None)
        add(f"mean training loss of the epoch, {size}", "loss",
            _get(figures, f, "baseline", "train_loss_token_weighted"),
            _get(figures, f, "glm_ft", "train_loss_token_weighted"), None)
        if size == "mid":
            base, glm = _get(figures, f, "baseline", "mfu_float32"), _get(figures, f, "glm_ft", "mfu_float32")
            add("model FLOP/s / fp32 matmul peak, mid", "fraction", base, glm, ratio(glm, base))
            glm = _get(figures, f, "glm_ft_grouped_bf16", "mfu_bfloat16")
            add("model FLOP/s / bf16 matmul peak, mid (glm-ft: grouped bf16)", "fraction",
                _get(figures, f, "baseline", "mfu_bfloat16"), glm, None)
        add(f"peak RSS, training {size}", "MiB", _get(figures, f, "baseline", "peak_rss_mib"),
            _get(figures, f, "glm_ft", "peak_rss_mib"), None)
    if "generation" in figures:
        add("eval generated tokens/s, tiny", "tokens/s", _get(figures, "generation", "baseline",
                                                               "generated_tokens_per_s"),
            _get(figures, "generation", "glm_ft", "generated_tokens_per_s"), ratios.get("eval_generated_tokens_per_s"))
        larger = _get(figures, "generation", "glm_ft_larger_batch", "eval_batch_size")
        usual = _get(figures, "generation", "baseline", "eval_batch_size")
        add(f"eval generated tokens/s, tiny, eval batch {larger} (baseline: {usual})", "tokens/s",
            _get(figures, "generation", "baseline", "generated_tokens_per_s"),
            _get(figures, "generation", "glm_ft_larger_batch", "generated_tokens_per_s"),
            ratios.get("eval_larger_batch_generated_tokens_per_s"))
        add(f"eval generated tokens/s, tiny, one batch of all {figures['generation'].get('outputs')} prompts",
            "tokens/s", _get(figures, "generation", "baseline", "generated_tokens_per_s"),
            _get(figures, "generation", "glm_ft_whole_set", "generated_tokens_per_s"),
            ratios.get("eval_whole_set_generated_tokens_per_s"))
        base_slots = _get(figures, "generation", "baseline", "decode_slots")
        base_tokens = _get(figures, "generation", "baseline", "generated_tokens")
        add("eval: generated tokens / decoded row-steps (baseline batches)", "fraction",
            ratio(base_tokens, base_slots), None, None)
        equal = (figures["generation"].get("outputs_equal_to_baseline") or {}).get("glm_ft")
        add(f"eval ROUGE-L (outputs equal on {equal} of {figures['generation'].get('outputs')} prompts)", "score",
            _get(figures, "generation", "baseline", "metrics") and
            _get(figures, "generation", "baseline", "metrics").get("rouge-l"),
            _get(figures, "generation", "glm_ft", "metrics") and
            _get(figures, "generation", "glm_ft", "metrics").get("rouge-l"), None)
        add("peak RSS, eval generation", "MiB", _get(figures, "generation", "baseline", "peak_rss_mib"),
            _get(figures, "generation", "glm_ft", "peak_rss_mib"), None)
    if "preprocessing" in figures:
        add("preprocessing rows/s (fresh cache)", "rows/s", _get(figures, "preprocessing", "baseline", "rows_per_s"),
            _get(figures, "preprocessing", "glm_ft", "rows_per_s"), ratios.get("preprocessing_rows_per_s"))
        add("preprocessing rows/s (cache reused)", "rows/s", _get(figures, "preprocessing", "baseline", "rows_per_s"),
            _get(figures, "preprocessing", "glm_ft_warm", "rows_per_s"), ratios.get("preprocessing_warm_rows_per_s"))
        add("peak RSS, preprocessing (main process)", "MiB", _get(figures, "preprocessing", "baseline",
                                                                   "peak_rss_mib"),
            _get(figures, "preprocessing", "glm_ft", "peak_rss_mib"), None)
        add("peak PSS, preprocessing (with worker processes)", "MiB",
            _get(figures, "preprocessing", "baseline", "peak_tree_pss_mib"),
            _get(figures, "preprocessing", "glm_ft", "peak_tree_pss_mib"), None)
    if "startup" in figures:
        base = _get(figures, "startup", "import_torch_transformers", "wall_s_median")
        for name, label in (("dry_run", "train.py experiment=quickstart dry_run=true"), ("train_help",
                                                                                          "train.py --help")):
            add(f"wall s, {label} (baseline: import torch, transformers)", "s", base,
                _get(figures, "startup", name, "wall_s_median"), ratios.get(f"{name}_vs_import_torch_transformers"))
            add(f"peak RSS, {label}", "MiB", _get(figures, "startup", "import_torch_transformers", "peak_rss_mib"),
                _get(figures, "startup", name, "peak_rss_mib"), None)
    if "matmul" in figures:
        peak = figures["matmul"]["sides"]["measured"]
        add("matmul peak fp32 / bf16 (torch.matmul, squares)", "GFLOP/s", peak.get("float32", {}).get("gflops"),
            peak.get("bfloat16", {}).get("gflops"), None)
    return rows


def goal_values(figures: dict[str, Any], ratios: dict[str, Any]) -> dict[str, float | None]:
    return {
        "training_tokens_per_s_ratio": ratios.get("training_mid_tokens_per_s"),
        "eval_generated_tokens_per_s_ratio": ratios.get("eval_generated_tokens_per_s"),
        "preprocessing_rows_per_s_ratio": ratios.get("preprocessing_rows_per_s"),
        "dry_run_wall_s": _get(figures, "startup", "dry_run", "wall_s_median"),
        "mid_training_mfu_fp32": _get(figures, "training_mid", "glm_ft", "mfu_float32"),
    }


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.0%}"


def _sci(x: float | None) -> str:
    return "?" if x is None else f"{x:.1e}"


def _x(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}x"


def notes(figures: dict[str, Any], ratios: dict[str, Any], goals: dict[str, Any]) -> list[str]:
    """Each goal met or missed, and why, in the run's own numbers."""
    out = [goal_summary(name, goal) for name, goal in goals.items()]
    for size in ("tiny", "mid"):
        f = f"training_{size}"
        if f not in figures:
            continue
        pad = {s: _get(figures, f, s, "padding_fraction") for s in ("baseline", "glm_ft", "glm_ft_grouped")}
        out.append(
            f"training {size}: glm-ft's default path differs from the reference's in attention "
            f"({_get(figures, f, 'glm_ft', 'attn_implementation')} vs "
            f"{_get(figures, f, 'baseline', 'attn_implementation')}) and sample order (random vs file order: "
            f"padding {_pct(pad['glm_ft'])} vs {_pct(pad['baseline'])} of batch slots), which gives "
            f"{_x(ratios.get(f'{f}_tokens_per_s'))}; group_by_length=true cuts padding to "
            f"{_pct(pad['glm_ft_grouped'])} ({_x(ratios.get(f'{f}_grouped_tokens_per_s'))}); with bf16=true as well "
            f"{_x(ratios.get(f'{f}_grouped_bf16_tokens_per_s'))}; data.packing=true pads "
            f"{_pct(_get(figures, f, 'glm_ft_packed', 'padding_fraction'))} "
            f"({_x(ratios.get(f'{f}_packed_tokens_per_s'))}; each sample's loss within "
            f"{_sci((figures[f].get('per_sample_loss_max_rel_diff') or {}).get('glm_ft_packed'))} relative of the "
            f"baseline's).")
    if "training_mid" in figures:
        out.append(
            "mid-size training reaches " + _pct(_get(figures, "training_mid", "glm_ft", "mfu_float32"))
            + " of the fp32 matmul peak (baseline " + _pct(_get(figures, "training_mid", "baseline", "mfu_float32"))
            + "); the rest goes to matrices far smaller than the peak's squares (hidden 512, ~400 rows a step), "
            "the AdamW step over every weight, norms, rotary, softmax and the Trainer's per-step work.")
    if "generation" in figures:
        tokens = _get(figures, "generation", "baseline", "generated_tokens")
        useful = ratio(tokens, _get(figures, "generation", "baseline", "decode_slots"))
        ceiling = 1 / useful if useful else None
        out.append(
            f"evaluation: glm-ft generates as the reference did (batches in file order, the same stop set, each batch "
            f"decoding until its longest row stops), so only attention differs: "
            f"{_x(ratios.get('eval_generated_tokens_per_s'))}. Of the row-steps the batches decode, {_pct(useful)} "
            f"produce tokens a reader gets; dropping finished rows could give at most {_x(ceiling)}. "
            f"A larger eval batch gives {_x(ratios.get('eval_larger_batch_generated_tokens_per_s'))} here.")
    if "preprocessing" in figures:
        glm = figures["preprocessing"]["sides"].get("glm_ft", {})
        parts = glm.get("breakdown_s") or {}
        out.append(
            f"preprocessing: glm-ft took {glm.get('seconds', 0):.1f} s for "
            f"{figures['preprocessing']['rows']:,} rows in one pass: reading and checking every row "
            f"{parts.get('read_and_check', 0):.1f} s, encoding every message in one SentencePiece call "
            f"{parts.get('encode', 0):.1f} s, laying out the samples {parts.get('lay_out_samples', 0):.1f} s, the rest "
            f"Arrow and the cache write; the baseline loads with datasets and encodes row by row "
            f"({_x(ratios.get('preprocessing_rows_per_s'))}). Every later run reuses glm-ft's cache "
            f"({_x(ratios.get('preprocessing_warm_rows_per_s'))}); the "
            f"reference tokenized again on every run.")
    load = os.getloadavg()
    out.append(f"load average at the end of the run: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
               f"on {os.cpu_count()} cores (a busy machine slows every figure; ratios suffer less, since sides "
               f"alternate and training rates use each step's fastest round)")
    return out


def assemble(figures: dict[str, Any], settings: dict[str, Any], machine: dict[str, Any], command: str,
             wall_s: float) -> dict[str, Any]:
    add_mfu(figures)
    ratios = compute_ratios(figures, RATIO_SOURCES)
    goals = check_goals(goal_values(figures, ratios))
    return {
        "schema": SCHEMA,
        "name": results_name(machine),
        "created": now_iso(),
        "command": command,
        "wall_s": round(wall_s, 1),
        "machine": machine,
        "versions": package_versions(),
        "settings": settings,
        "figures": figures,
        "ratio_sources": {k: list(v) for k, v in RATIO_SOURCES.items()},
        "ratios": ratios,
        "goals": goals,
        "notes": notes(figures, ratios, goals),
        "table": table(figures, ratios),
    }


def write_results(results: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{results['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the harness, not for quoting")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--sides", help=f"training sides to run (default all: {','.join(TRAINING_SIDES)})")
    parser.add_argument("--rounds", type=int, help="training rounds per side (default: 3 tiny, 2 mid)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", help="results file name (default: from the CPU model and core count)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (models, data, specs)")
    parser.add_argument("--table", type=Path, help="print the markdown table of a saved results file and exit")
    args = parser.parse_args(argv)

    if args.table:
        print(format_table(json.loads(args.table.read_text()), markdown=True))
        return 0
    only = args.only.split(",") if args.only else list(FIGURES)
    unknown = set(only) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(sorted(unknown))}; choose from {', '.join(FIGURES)}")
    settings = _merge(SETTINGS, QUICK) if args.quick else dict(SETTINGS)
    settings["quick"] = args.quick
    if args.sides:
        sides = args.sides.split(",")
        if "baseline" not in sides or set(sides) - set(TRAINING_SIDES):
            parser.error(f"--sides: a subset of {','.join(TRAINING_SIDES)} that includes baseline")
        settings["training_sides"] = sides
    if args.rounds:
        settings["training_rounds"] = {size: args.rounds for size in settings["training_rounds"]}
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="glm-ft-bench-"))
    log(f"scratch folder {work}; load average {machine['loadavg_at_start']}")
    start = time.perf_counter()
    bench = Bench(settings, work)
    try:
        for figure in FIGURES:
            if figure not in only:
                continue
            log(f"{figure} ...")
            t = time.perf_counter()
            if figure.startswith("training_"):
                bench.figures[figure] = bench.training(figure.split("_", 1)[1])
            else:
                bench.figures[figure] = getattr(bench, figure)()
            bench.figures[figure]["figure_wall_s"] = round(time.perf_counter() - t, 1)
        if "matmul" in bench.figures and len(only) > 1:
            log("matmul again ...")
            bench.matmul_again()
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    command = "python bench/run.py" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")
    results = assemble(bench.figures, settings, machine, command, time.perf_counter() - start)
    if args.name:
        results["name"] = args.name
    elif args.quick:
        results["name"] += "-quick"
    problems = validate_results(results)
    if problems:
        log("results do not validate: " + "; ".join(problems))
    path = write_results(results, args.out_dir)
    print(format_table(results))
    print()
    for line in results["notes"]:
        print(f"- {line}")
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
          f"({results['wall_s']:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
