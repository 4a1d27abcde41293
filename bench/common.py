"""What the bench's processes share: FLOP counts, glm-ft's overrides, machine facts, and running a child with its
peak memory measured. No torch here: the orchestrator imports this module, and its own start-up must not weigh on
what it measures."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
SCHEMA = "glm-ft-bench/1"

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "accelerate", "datasets", "tokenizers", "sentencepiece",
            "hydra-core", "omegaconf", "mlflow", "numpy")

# --- FLOPs ----------------------------------------------------------------------------------------------------


def matmul_params(config: Mapping[str, Any]) -> int:
    """Weights every token multiplies through: all linear layers and the output layer of a ChatGLM3 config.

    The input embedding is a table lookup (no FLOPs); norms and biases are O(hidden) per token and left out.
    """
    h, ffn, kv = config["hidden_size"], config["ffn_hidden_size"], config["kv_channels"]
    heads = config["num_attention_heads"]
    groups = config.get("multi_query_group_num", heads) if config.get("multi_query_attention", False) else heads
    qkv = h * (heads + 2 * groups) * kv
    dense = heads * kv * h
    mlp = h * 2 * ffn + ffn * h  # SwiGLU: dense_h_to_4h gives two halves, dense_4h_to_h maps one back
    return config["num_layers"] * (qkv + dense + mlp) + h * config["padded_vocab_size"]


def attention_pairs(seq_lens: Sequence[int], prefix_len: int = 0) -> int:
    """(query, key) pairs causal attention really scores: n(n+1)/2 for a row of n tokens, plus n·prefix_len."""
    return sum(n * (n + 1) // 2 + n * prefix_len for n in seq_lens)


def training_flops(config: Mapping[str, Any], seq_lens: Sequence[int], *, all_weights_train: bool = True,
                   prefix_len: int = 0, targets: int | None = None) -> int:
    """Model FLOPs of forward plus backward; padding is not counted: these are the model's FLOPs, not the machine's.

    The forward pass takes 2 FLOPs (multiply, add) per matmul weight per token, and 2 · 2 · heads · kv_channels per
    scored (query, key) pair and layer (QKᵀ and PV). The backward pass computes activation gradients (2 FLOPs per
    weight per token) and, for weights that train, weight gradients (2 more): 6·N per token for full fine-tuning,
    4·N for a frozen base (LoRA, P-Tuning v2, whose own weights add < 1 % and are left out). Attention has no
    weights; its backward is counted as twice its forward, so attention contributes 3× its forward FLOPs either way.
    With `targets` (the tokens that have one), the output layer counts at those tokens only: the loss needs no
    logits elsewhere, so logits for prompt tokens are not useful work.
    """
    tokens = sum(seq_lens)
    head = config["hidden_size"] * config["padded_vocab_size"]
    weights = (matmul_params(config) - head) * tokens + head * (tokens if targets is None else targets)
    attn = 4 * config["num_layers"] * config["num_attention_heads"] * config["kv_channels"]
    return (6 if all_weights_train else 4) * weights + 3 * attn * attention_pairs(seq_lens, prefix_len)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is not positive."""
    return None if numerator is None or denominator is None or denominator <= 0 else numerator / denominator


def overrides(model: str | Path, data: str | Path, settings: Mapping[str, Any]) -> list[str]:
    """What every glm-ft side sets: the quickstart on the bench's model, data and lengths, with no checkpoints and
    no evaluation during training."""
    return ["experiment=quickstart", f"model.path={model}", f"data.data_dir={data}", "data.train_file=train.json",
            "data.val_file=null", f"max_input_length={settings['max_input_length']}",
            f"max_output_length={settings['max_output_length']}", "training_args.save_strategy=no",
            "training_args.evaluation_strategy=no"]


# --- machine --------------------------------------------------------------------------------------------------


def _proc_field(path: str, key: str) -> str | None:
    """The value after `key` in a /proc text file (cpuinfo, meminfo, status); None where /proc can't say."""
    try:
        return next((line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines()
                     if line.startswith(key)), None)
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    ram_kib = _proc_field("/proc/meminfo", "MemTotal:")
    return {"cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
            "cores": os.cpu_count(), "ram_gib": round(int(ram_kib.split()[0]) / 2**20, 1) if ram_kib else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "bf16_flags": cpu_bf16_flags()}


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bf16 instructions. Without them torch emulates bf16 matmuls, tens of times slower than
    fp32 (a 1024 square: 3 s against 0.05 s on an AVX2-only EPYC), and a bf16 training side would run for hours."""
    flags = (_proc_field("/proc/cpuinfo", "flags") or "").split()
    return sorted({"avx512_bf16", "amx_bf16"} & set(flags))


def package_versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in PACKAGES}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# --- child processes ------------------------------------------------------------------------------------------


def vm_hwm_mib(pid: int | str = "self") -> float | None:
    """Peak resident memory of a live process's address space (VmHWM), in MiB; None where /proc can't say."""
    hwm = _proc_field(f"/proc/{pid}/status", "VmHWM:")
    return round(int(hwm.split()[0]) / 1024, 1) if hwm else None


def tree_pss_mib(pid: int) -> tuple[float, int]:
    """Summed PSS of `pid` and all its descendants (pages they share counted once), in MiB, and how many they are."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text() if entry.name.isdigit() else None
        except OSError:
            stat = None
        if stat:
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    total, count, stack = 0, 0, [pid]
    while stack:
        member = stack.pop()
        stack += children.get(member, [])
        pss = _proc_field(f"/proc/{member}/smaps_rollup", "Pss:")
        if pss:
            total, count = total + int(pss.split()[0]), count + 1
    return round(total / 1024, 1), count


def run_measured(cmd: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
                 timeout: float | None = None, tree: bool = False, watch: bytes | None = None) -> dict[str, Any]:
    """Run `cmd`: its exit code, output (stdout and stderr as one stream), wall time and peak memory
    (bench/README.md, "Peak memory").

    The peak is the child's own VmHWM sampled every 5 ms: rusage's figure starts from the parent's size (Linux
    carries the forking process's high-water mark across exec). With `tree`, the PSS of the child with its
    descendants is sampled every 100 ms. With `watch`, the output is read as it comes, and `watch_s` is the time to
    the first read holding `watch` (an event, not a polled guess).
    """
    argv = ("\0".join(cmd) + "\0").encode()
    peaks: list[float] = []
    tree_peaks: list[tuple[float, int]] = []
    seen: list[float] = []
    done, killed = threading.Event(), threading.Event()
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        # Only a watched run reads a pipe: a grandchild left holding it open would keep a reader waiting.
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE if watch else out,
                                stderr=subprocess.STDOUT)

        def read() -> None:
            tail = b""
            for chunk in iter(lambda: os.read(proc.stdout.fileno(), 65536), b""):
                if not seen and watch in tail + chunk:
                    seen.append(time.perf_counter() - start)
                tail = (tail + chunk)[-len(watch):]
                out.write(chunk)

        def sample() -> None:
            started, tick = False, 0
            while not done.wait(0.005):
                try:  # until exec, a vfork()ed child still shows its parent's address space
                    started = started or Path(f"/proc/{proc.pid}/cmdline").read_bytes() == argv
                except OSError:
                    pass
                hwm = vm_hwm_mib(proc.pid) if started else None
                if hwm is not None:
                    peaks.append(hwm)
                tick += 1
                if tree and started and tick % 20 == 0:
                    tree_peaks.append(tree_pss_mib(proc.pid))
                if timeout is not None and time.perf_counter() - start > timeout and not killed.is_set():
                    killed.set()
                    proc.kill()

        threads = [threading.Thread(target=f, daemon=True) for f in ([sample, read] if watch else [sample])]
        for thread in threads:
            thread.start()
        _, status, _ = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        for thread in threads:
            thread.join()
        if watch:
            proc.stdout.close()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        out.seek(0)
        output = out.read().decode(errors="replace")
    return {
        "returncode": proc.returncode,
        "timed_out": killed.is_set(),
        "output": output,
        "wall_s": wall,
        # None when the child ended before the first sample (a few milliseconds)
        "peak_rss_mib": max(peaks) if peaks else None,
        "peak_tree_pss_mib": max((p for p, _ in tree_peaks), default=None) if tree else None,
        "max_processes": max((n for _, n in tree_peaks), default=None) if tree else None,
        # On a loaded machine the reader can get the chunk only after the child has exited: the event was no later.
        "watch_s": min(seen[0], wall) if seen else None,
    }
