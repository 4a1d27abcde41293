"""GPU bench: LoRA and P-Tuning v2 on a chatglm3-6b-shaped model with random bf16 weights.

Peak GPU memory, tokens/s and model FLOP/s against the measured bf16 matmul peak (bench/README.md, "GPU mode").

    python bench/gpu.py                  # what `make bench-gpu` runs; needs CUDA
    python bench/gpu.py --cpu-smoke      # the same code on the CPU with the tiny shape: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/gpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    RESULTS_DIR, SCHEMA, machine_info, matmul_params, now_iso, package_versions, ratio, training_flops,
)
from bench.matmul import peak  # noqa: E402
from glm_ft.chatglm3.tiny import CHATGLM3_6B_CONFIG, TINY_CONFIG  # noqa: E402  (light: no torch)

SEED = 42
# batch 4 of full-length rows (prompt_len + reply_len + 1 tokens): the worst case these settings meet
SETTINGS = {"methods": ["lora", "ptuning_v2"], "checkpointing": [False, True], "batch_size": 4, "prompt_len": 256,
            "reply_len": 512, "warmup": 3, "steps": 10}
SMOKE = {"warmup": 1, "steps": 2, "prompt_len": 16, "reply_len": 16}
PUBLISHED_MIB = {"lora": 14_082, "ptuning_v2": 18_426}
PUBLISHED_NOTE = ("ChatGLM3 finetune_demo README, older and smaller settings than these; nvidia-smi figures "
                  "(CUDA context included)")


def build_model(config: dict[str, Any], device: str):
    """Random weights, created directly on `device`: a 6B model never passes through host memory."""
    # transformers, peft and glm-ft's model code are imported once past the CUDA check, which refuses at once
    import glm_ft.chatglm3 as chatglm3
    from glm_ft.chatglm3.configuration import ChatGLMConfig
    from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration

    chatglm3.register()
    with torch.device(device):
        model = ChatGLMForConditionalGeneration._from_config(
            ChatGLMConfig.from_dict(config), dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def run_variant(config: dict[str, Any], method: str, checkpointing: bool, s: dict[str, Any], device: str,
                peak_flops: float) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from glm_ft.config.schema import METHOD_SCHEMAS
    from glm_ft.model import apply_method, parameter_counts

    cuda = device == "cuda"
    length = s["prompt_len"] + s["reply_len"] + 1
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = optimizer = None
    try:
        method_cfg = OmegaConf.structured(METHOD_SCHEMAS[method])  # as `method=lora|ptuning_v2` composes it
        model = apply_method(build_model(config, device), method_cfg, SEED)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        counts = parameter_counts(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
        # random token ids; the prompt part carries no loss, as in glm-ft's samples
        ids = torch.randint(3, config["padded_vocab_size"] - 16, (s["batch_size"], length),
                            generator=torch.Generator().manual_seed(SEED))
        labels = torch.where(torch.arange(length) < s["prompt_len"], -100, ids)
        inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                  "labels": labels.to(device)}
        losses, step_end = [], []
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(s["warmup"] + s["steps"]):
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())  # .item() syncs, so each step end is real
            step_end.append(time.perf_counter())
        seconds = step_end[-1] - step_end[s["warmup"] - 1]
        rows = s["batch_size"] * s["steps"]
        prefix = method_cfg.num_virtual_tokens if method == "ptuning_v2" else 0
        flops = training_flops(config, [length] * rows, all_weights_train=False, prefix_len=prefix)
        out = {"method": method, "gradient_checkpointing": checkpointing, **counts,
               "first_step_s": step_end[0] - start, "timed_steps": s["steps"], "timed_s": seconds,
               "tokens_per_s": rows * length / seconds, "model_flops_per_s": flops / seconds,
               "loss_first_last": [losses[0], losses[-1]], "mfu": flops / seconds / peak_flops}
        if cuda:
            out["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20)
            out["peak_allocated_vs_published"] = ratio(out["peak_allocated_mib"], PUBLISHED_MIB[method])
        return out
    except torch.OutOfMemoryError as err:
        return {"method": method, "gradient_checkpointing": checkpointing, "error": f"out of memory: {err}"[:400]}
    finally:
        del model, optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the same code on the CPU with the tiny shape (checks the script; writes nothing)")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: bench/gpu.py needs a CUDA GPU and torch with CUDA "
              f"(torch {torch.__version__}, torch.cuda.is_available() is False). "
              "Use `make bench` for the CPU bench, or --cpu-smoke to check this script.", file=sys.stderr)
        return 2
    device, config = ("cpu", TINY_CONFIG) if args.cpu_smoke else ("cuda", CHATGLM3_6B_CONFIG)
    settings = {**SETTINGS, **(SMOKE if args.cpu_smoke else {}), "cpu_smoke": args.cpu_smoke}
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema": SCHEMA, "created": now_iso(),
        "command": " ".join(["python bench/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(), "versions": {**package_versions(), "cuda": torch.version.cuda},
        "settings": settings, "model": {"config": config, "matmul_params": matmul_params(config)},
        "published_mib": PUBLISHED_MIB, "published_note": PUBLISHED_NOTE,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        results["machine"]["gpu"] = {"name": props.name, "memory_mib": props.total_memory // 2**20,
                                     "count": torch.cuda.device_count()}
    size, seconds = (256, 0.1) if args.cpu_smoke else (8192, 3.0)
    results["matmul_peak"] = {dtype: peak(dtype, size, seconds, device) for dtype in ("bfloat16", "float32")}
    peak_flops = results["matmul_peak"]["bfloat16"]["gflops"] * 1e9

    variants = results["variants"] = []
    for method in settings["methods"]:
        for checkpointing in settings["checkpointing"]:
            print(f"[bench-gpu] {method} gradient_checkpointing={checkpointing} ...", file=sys.stderr, flush=True)
            variants.append(run_variant(config, method, checkpointing, settings, device, peak_flops))
    results["wall_s"] = round(time.perf_counter() - started, 1)

    print(f"{'method':<11} {'ckpt':<5} {'peak alloc MiB':>14} {'published MiB':>13} {'tokens/s':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6}")
    for v in variants:
        row = v["error"][:60] if "error" in v else (
            f"{v.get('peak_allocated_mib', '-'):>14} {PUBLISHED_MIB[v['method']]:>13,} {v['tokens_per_s']:>9,.0f} "
            f"{v['model_flops_per_s'] / 1e12:>8.1f} {v['mfu']:>6.1%}")
        print(f"{v['method']:<11} {str(v['gradient_checkpointing']):<5} {row}")
    print(f"matmul peak bfloat16: {peak_flops / 1e12:.1f} TFLOP/s; wall {results['wall_s']:.0f} s")
    if args.cpu_smoke:
        return 1 if any("error" in v for v in variants) else 0
    name = "gpu-" + re.sub(r"[^a-z0-9]+", "-", results["machine"]["gpu"]["name"].lower()).strip("-")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
