"""The CPU bench: every figure beside its baseline, in one run, each side in its own process.

Usage, what each side does and how it is counted: bench/README.md.

    python bench/run.py [--quick] [--only training_mid,generation] [--table bench/results/NAME.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import advertisegen  # noqa: E402
from bench.common import RESULTS_DIR, ROOT, cpu_bf16_flags, machine_info, overrides, run_measured  # noqa: E402
from bench.results import (  # noqa: E402
    assemble, combine_rounds, format_table, max_rel_diff, same_value, summarize, validate_results,
)

FIGURES = ("matmul", "startup", "first_step", "preprocessing", "training_tiny", "training_mid", "memory_mid",
           "generation")
SHARED = ("seed", "method", "max_input_length", "max_output_length", "batch_size", "learning_rate")
# the training sides and what each sets on top of glm-ft's defaults (the baseline is the reference's data path and
# loss)
TRAINING_SIDES = {"baseline": [], "glm_ft": [], "glm_ft_bf16": ["training_args.bf16=true"],
                  "glm_ft_packed": ["data.packing=true"]}

SETTINGS = {
    "seed": 42,
    "method": "sft",  # the quickstart's method on the random tiny model; FLOPs are then 6·N per token
    # mid size: as issue 16 measured it, ChatGLM3's real 65,024-token vocabulary and LoRA r 8 (method=lora's default)
    "max_input_length": 64,
    "max_output_length": 128,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "training": {"tiny": {"steps": 100, "warmup_steps": 5},
                 "mid": {"steps": 30, "warmup_steps": 4, "model": "mid_vocab", "method": "lora"}},
    # each side runs this many times, alternating sides; see bench.results.combine_rounds
    "training_rounds": {"tiny": 3, "mid": 2},
    "memory_mid": {"steps": 6, "warmup_steps": 2},
    # eval_batch_size 16: the reference's per_device_eval_batch_size and glm-ft's default alike
    "eval": {"train_rows": 2400, "train_steps": 300, "train_batch_size": 8, "prompts": 256, "eval_batch_size": 16,
             "max_new_tokens": 128},
    "preprocessing": {"rows": 100_000, "num_proc": 16},
    "startup": {"repeats": 5},
    "first_step": {"repeats": 3, "steps": 5, "rows": 400},
    "matmul": {"sizes": [1024, 2048, 4096], "seconds": 1.5},
}

QUICK = {  # each entry replaces the whole of SETTINGS' one
    "training": {"tiny": {"steps": 12, "warmup_steps": 2},
                 "mid": {"steps": 8, "warmup_steps": 2, "model": "mid_vocab", "method": "lora"}},
    "training_rounds": {"tiny": 1, "mid": 1},
    "memory_mid": {"steps": 3, "warmup_steps": 1},
    "eval": {"train_rows": 400, "train_steps": 50, "train_batch_size": 8, "prompts": 16, "eval_batch_size": 8,
             "max_new_tokens": 32},
    "preprocessing": {"rows": 5_000, "num_proc": 16},
    "startup": {"repeats": 2},
    "first_step": {"repeats": 1, "steps": 2, "rows": 100},
    "matmul": {"sizes": [512], "seconds": 0.5},
}

CHILD_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "TOKENIZERS_PARALLELISM": "false",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "PYTHONWARNINGS": "ignore"}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def interleave(names: list[str], rounds: int, run) -> dict[str, list[dict[str, Any]]]:
    """run(name) for every side, `rounds` times, reversing the order each round so that a busy spell on the
    machine hits every side alike."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            log(f"  {name} (round {r + 1} of {rounds})")
            out[name].append(run(name))
    return out


class Bench:
    def __init__(self, settings: dict[str, Any], work: Path):
        self.settings, self.work = settings, work
        self.env = {**os.environ, **CHILD_ENV, "HF_DATASETS_CACHE": str(work / "hf-datasets")}
        self.env.pop("HYDRA_FULL_ERROR", None)
        self.runs = 0
        self.matmul_runs: list[dict[str, Any]] = []
        self.models: dict[str, str] = {}

    def command(self, cmd: list[str], timeout: float = 900, **kwargs: Any) -> dict[str, Any]:
        return run_measured(cmd, cwd=ROOT, env=self.env, timeout=timeout, **kwargs)

    def side(self, spec: dict[str, Any], tree: bool = False) -> dict[str, Any]:
        """One side of a figure in its own process (bench/worker.py): its result and peak RSS (and, with `tree`,
        the peak PSS of the process with its workers)."""
        self.runs += 1
        spec_path, out_path = self.work / f"spec-{self.runs}.json", self.work / f"out-{self.runs}.json"
        spec_path.write_text(json.dumps(spec))
        run = self.command([sys.executable, "-m", "bench.worker", str(spec_path), str(out_path)], 1800, tree=tree)
        if run["returncode"] != 0 or not out_path.is_file():
            tail = "\n".join(run["output"].strip().splitlines()[-15:])
            log(f"{spec['figure']} {spec.get('side', '')} failed (exit {run['returncode']}):\n{tail}")
            return {"error": tail, "peak_rss_mib": run["peak_rss_mib"]}
        result = json.loads(out_path.read_text())
        # The worker's own VmHWM, read as its last act, can't miss a late peak the way sampling can.
        peaks = [result.pop("self_peak_rss_mib", None), run["peak_rss_mib"]]
        result["peak_rss_mib"] = max(filter(None, peaks), default=None)
        if tree:
            result["peak_tree_pss_mib"] = run["peak_tree_pss_mib"]
        return result

    def spec(self, figure: str, data: Path, **extra: Any) -> dict[str, Any]:
        shared = {key: self.settings[key] for key in SHARED}
        return {"figure": figure, "data_dir": str(data), "work_dir": str(self.work), **shared, **extra}

    def data(self, name: str, seed: int, rows: int, test_rows: int = 0) -> Path:
        """A folder of generated AdvertiseGen rows: train.json, and test.json if asked for."""
        folder = self.work / f"data-{name}"
        advertisegen.write(folder / "train.json", rows, seed=seed)
        if test_rows:
            advertisegen.write(folder / "test.json", test_rows, seed=seed + 1)
        return folder

    def model_dir(self, size: str) -> str:
        """The model folder of `size`, built by a worker: the orchestrator never imports torch."""
        if size not in self.models:
            built = self.side({"figure": "model", "size": size, "work_dir": str(self.work)})
            if "error" in built:
                raise RuntimeError(f"building the {size} model failed")
            self.models[size] = built["model_dir"]
        return self.models[size]

    # --- figures (bench/README.md, "What each figure compares") ------------------------------------------------

    def matmul(self) -> dict[str, Any]:
        """Run first and again last (a busy spell can hit either): the higher of the runs is the peak."""
        self.matmul_runs.append(self.side({"figure": "matmul", **self.settings["matmul"]}))
        runs = self.matmul_runs
        sides = {d: {"gflops": max(r.get(d, {}).get("gflops", 0) for r in runs) or None,
                     "gflops_each_run": [r.get(d, {}).get("gflops") for r in runs],
                     "peak_rss_mib": max(r["peak_rss_mib"] or 0 for r in runs)} for d in ("float32", "bfloat16")}
        return {"sides": sides}

    def startup(self) -> dict[str, Any]:
        commands = {"import_torch_transformers": [sys.executable, "-c", "import torch, transformers"],
                    "dry_run": [sys.executable, "train.py", "experiment=quickstart", "dry_run=true",
                                f"hydra.run.dir={self.work / 'dry-run'}"]}
        runs = interleave(list(commands), self.settings["startup"]["repeats"],
                          lambda name: self.command(commands[name], 300))
        return {"sides": {name: summarize(done, ["wall_s"]) for name, done in runs.items()}}

    def first_step(self) -> dict[str, Any]:
        cfg, s = self.settings["first_step"], self.settings
        data, model = self.data("first-step", 5, cfg["rows"]), self.model_dir("tiny")
        shape = [f"--max-steps={cfg['steps']}", f"--max-input-length={s['max_input_length']}",
                 f"--max-output-length={s['max_output_length']}", f"--batch-size={s['batch_size']}"]
        runs = iter(range(1000))  # each run its own folders

        def commands() -> dict[str, list[str]]:
            run = self.work / f"first-step-{next(runs)}"
            glm_ft = [sys.executable, "train.py", *overrides(model, data, s), "method=lora", "method.r=8",
                      "data.test_file=null", f"training_args.per_device_train_batch_size={s['batch_size']}",
                      f"training_args.max_steps={cfg['steps']}", "training_args.logging_steps=1",
                      f"tracking.tracking_uri=sqlite:///{self.work / 'first-step-mlflow.db'}",
                      f"hydra.run.dir={run / 'glm'}"]
            return {"baseline": [sys.executable, "bench/reference_finetune.py", str(data), str(model),
                                 str(run / "ref"), *shape],
                    "glm_ft": glm_ft, "glm_ft_untracked": [*glm_ft, "tracking.enabled=false"]}

        def measure(name: str) -> dict[str, Any]:
            measured = self.command(commands()[name], tree=True, watch=b"'loss'")
            losses = re.findall(r"'loss': '?([0-9.]+)", measured["output"])
            log(f"    exit {measured['returncode']}, first step at {measured['watch_s']} s, wall "
                f"{measured['wall_s']:.1f} s, peak PSS {measured['peak_tree_pss_mib']} MiB, losses {losses}")
            return {**measured, "first_step_s": measured["watch_s"], "losses": [float(x) for x in losses]}

        # Untimed first runs fill both preprocessing caches and create glm-ft's MLflow store (a new SQLite store
        # runs MLflow's schema migrations once); glm_ft_untracked shares glm_ft's caches.
        warm_up = commands()
        for name in ("baseline", "glm_ft"):
            run = self.command(warm_up[name])
            if run["returncode"] != 0:
                log(f"first_step {name} (cache warm-up) failed:\n{run['output'][-2000:]}")
        done = interleave(["baseline", "glm_ft", "glm_ft_untracked"], cfg["repeats"], measure)
        keys = ["first_step_s", "wall_s", "peak_tree_pss_mib"]
        sides = {name: {**summarize(runs, keys), "losses": [r["losses"] for r in runs]} for name, runs in done.items()}
        return {"sides": sides, "steps": cfg["steps"]}

    def preprocessing(self) -> dict[str, Any]:
        cfg = self.settings["preprocessing"]
        base = self.spec("preprocessing", self.data("prep", 4, cfg["rows"]), num_proc=cfg["num_proc"])
        sides = {side: self.side({**base, "side": side}, tree=True) for side in ("baseline", "glm_ft")}
        digests = {v.get("samples_sha256_16") for v in sides.values()}
        return {"sides": sides, "rows": cfg["rows"], "same_samples": None not in digests and len(digests) == 1}

    def training(self, size: str) -> dict[str, Any]:
        cfg = dict(self.settings["training"][size])
        model = cfg.pop("model", size)
        rows = cfg["steps"] * self.settings["batch_size"]
        base = self.spec("training", self.data(f"train-{size}", 1, rows), size=model, model_dir=self.model_dir(model),
                         **cfg)
        runs = interleave(self.settings["training_sides"], self.settings["training_rounds"][size],
                          lambda side: self.side({**base, "side": side, "overrides": TRAINING_SIDES[side],
                                                  "full_logits": side == "baseline"}))
        sides = {}
        for side, done in runs.items():
            ok = [d for d in done if "step_s" in d]
            first = {k: v for k, v in (ok[0] if ok else done[-1]).items()
                     if k not in ("step_s", "step_tokens", "step_flops")}
            sides[side] = {**first, **combine_rounds(ok), "peak_rss_mib": max(d["peak_rss_mib"] or 0 for d in done),
                           "errors": [d["error"] for d in done if "error" in d]}
        per_sample = {side: v.pop("per_sample_loss", None) for side, v in sides.items()}
        fp32 = [side for side, v in sides.items() if not v.get("bf16")]
        return {
            "sides": sides,
            "samples": rows,
            # a frozen base loads in bf16 under bf16=true (model.torch_dtype auto): the fp32 sides' weights are equal
            "same_weights": len({sides[side].get("weights_sha256_16") for side in fp32}) == 1,
            # fp32 sides must agree to rounding; bf16 autocast moves the loss by bf16's precision (~1e-3 relative)
            "same_initial_loss": same_value([sides[side].get("initial_loss_over_set") for side in fp32], 1e-4),
            # each sample's own loss, packed or not, against the baseline's (the samples are keyed by their tokens)
            "per_sample_loss_max_rel_diff": {side: max_rel_diff(per_sample["baseline"], per_sample[side])
                                             for side in fp32 if side != "baseline"},
        }

    def memory_mid(self) -> dict[str, Any]:
        """glm-ft's LoRA training at mid size with the real vocabulary: its chunked loss against the full logits."""
        cfg = self.settings["memory_mid"]
        data = self.data("memory-mid", 1, cfg["steps"] * self.settings["batch_size"])
        base = {**self.spec("training", data, size="mid_vocab", model_dir=self.model_dir("mid_vocab"), **cfg),
                "method": "lora", "side": "glm_ft", "loss_over_set": False}
        sides = {"full_logits": self.side({**base, "full_logits": True}), "glm_ft": self.side(base)}
        log(f"  peak RSS: full logits {sides['full_logits']['peak_rss_mib']} MiB, chunked "
            f"{sides['glm_ft']['peak_rss_mib']} MiB")
        losses = [v.get("train_losses") for v in sides.values()]
        return {"sides": sides, "same_train_losses_max_rel_diff": max_rel_diff(*losses)}

    def generation(self) -> dict[str, Any]:
        cfg = self.settings["eval"]
        base = self.spec("generation", self.data("eval", 2, cfg["train_rows"], cfg["prompts"]),
                         model_dir=self.model_dir("tiny"), **cfg)
        log("generation: fine-tuning the tiny model both sides will evaluate")
        trained = self.side({**base, "figure": "eval_model", "out_dir": str(self.work / "eval-model")})
        if "error" in trained:
            return {"sides": {}, "eval_model": trained}
        sides = {side: self.side({**base, "model_dir": trained["out_dir"], "side": side})
                 for side in ("baseline", "glm_ft")}
        predictions = {side: v.pop("predictions", None) for side, v in sides.items()}
        equal = None if None in predictions.values() else sum(
            a == b for a, b in zip(predictions["baseline"], predictions["glm_ft"]))
        return {"sides": sides, "eval_model": trained, "outputs": cfg["prompts"], "outputs_equal": equal}

    def run(self, figure: str) -> dict[str, Any]:
        if figure.startswith("training_"):
            return self.training(figure.removeprefix("training_"))
        return getattr(self, figure)()


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
        print(format_table(json.loads(args.table.read_text())))
        return 0
    only = args.only.split(",") if args.only else list(FIGURES)
    if set(only) - set(FIGURES):
        parser.error(f"unknown figure(s) {', '.join(sorted(set(only) - set(FIGURES)))}; choose from {FIGURES}")
    sides = args.sides.split(",") if args.sides else list(TRAINING_SIDES)
    if not args.sides and not cpu_bf16_flags():
        sides.remove("glm_ft_bf16")  # emulated bf16 (bench.common.cpu_bf16_flags); --sides can still ask for it
        log("training: no bf16 side (this CPU has no avx512_bf16 / amx_bf16: torch would emulate bf16)")
    if "baseline" not in sides or set(sides) - set(TRAINING_SIDES):
        parser.error(f"--sides: a subset of {','.join(TRAINING_SIDES)} that includes baseline")
    settings = {**SETTINGS, **(QUICK if args.quick else {}), "quick": args.quick, "training_sides": sides}
    if args.rounds:
        settings["training_rounds"] = {size: args.rounds for size in settings["training_rounds"]}
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="glm-ft-bench-"))
    log(f"scratch folder {work}; load average {machine['loadavg_at_start']}")
    start = time.perf_counter()
    bench, figures = Bench(settings, work), {}
    try:
        for figure in (f for f in FIGURES if f in only):
            log(f"{figure} ...")
            t = time.perf_counter()
            figures[figure] = {**bench.run(figure), "figure_wall_s": round(time.perf_counter() - t, 1)}
        if "matmul" in figures and len(only) > 1:
            log("matmul again ...")
            t, first_wall = time.perf_counter(), figures["matmul"]["figure_wall_s"]
            figures["matmul"] = {**bench.matmul(), "figure_wall_s": round(first_wall + time.perf_counter() - t, 1)}
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    command = " ".join(["python bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    results = assemble(figures, settings, machine, command, time.perf_counter() - start)
    results["name"] = args.name or results["name"] + ("-quick" if args.quick else "")
    problems = validate_results(results)
    if problems:
        log("results do not validate: " + "; ".join(problems))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{results['name']}.json"
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_table(results))
    print("\n" + "\n".join(f"- {line}" for line in results["notes"]))
    print(f"\nwrote {path} ({results['wall_s']:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
