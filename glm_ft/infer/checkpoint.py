"""Open what training left: a run folder, one of its checkpoints, or a plain model folder.

    find_checkpoint(path, base_model=None) -> Checkpoint        # where things are; reads no weights
    load_checkpoint(path, base_model=None, ...) -> Loaded       # tokenizer + model ready for generate()

What a folder holds decides how it opens:
- a run folder (`glm_ft_run.json`): its `final/`, or else its newest complete `checkpoint-N/`;
- a LoRA checkpoint (`adapter_config.json`): the base model + the PEFT adapter;
- a P-Tuning v2 checkpoint (`prefix_encoder.safetensors`): the base model + the prefix;
- a freeze-tuning checkpoint (`trained_weights.safetensors`): the base model + the trained tensors;
- a full model (`config.json` + weights): an SFT checkpoint, an exported model, the tiny model, or a whole-model
  P-Tuning v2 checkpoint of the reference demo (`pre_seq_len` in its config, the prefix among its weights).

Each kind is a method's (glm_ft/methods/: `holds_checkpoint`, `load_onto`). The base model is the one recorded in
the run's `glm_ft_run.json` (for a LoRA adapter outside a run: the adapter's `base_model_name_or_path`);
`base_model=` overrides it. chat, predict and export all open checkpoints here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glm_ft import methods
from glm_ft.errors import CheckpointError
from glm_ft.heap import long_lived
from glm_ft.methods import freeze, lora, ptuning_v2, sft
from glm_ft.methods.lora import ADAPTER_CONFIG
from glm_ft.methods.ptuning_v2 import PREFIX_TENSOR
from glm_ft.runs import COMPLETE_MARKER, PREFIX_WEIGHTS, RUN_INFO, is_complete, newest_complete

log = logging.getLogger(__name__)

LORA, PTUNING, FULL, FREEZE = lora.KIND, ptuning_v2.KIND, sft.KIND, freeze.KIND


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the folder that holds the trained weights
    kind: str  # a method's KIND: LORA, PTUNING, FREEZE or FULL
    base_model: Path | None  # the model an adapter or prefix applies to; None for a full model
    tokenizer_dir: Path
    run_info: dict[str, Any] | None  # glm_ft_run.json of the run it belongs to, if any

    def describe(self) -> str:
        what = methods.by_kind(self.kind).DESCRIPTION
        return f"{what} {self.path}" + (f" on {self.base_model}" if self.base_model else "")


@dataclass
class Loaded:
    checkpoint: Checkpoint
    tokenizer: Any
    model: Any  # in eval mode; a PeftModel for an unmerged LoRA adapter


def find_checkpoint(path: str | Path, base_model: str | Path | None = None) -> Checkpoint:
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a run, checkpoint or model folder)")

    if (path / RUN_INFO).is_file():
        run_dir, folder = path, newest_complete(path)
    else:
        run_dir = path.parent if (path.parent / RUN_INFO).is_file() else None
        folder = path
        if run_dir is not None and not is_complete(folder):
            raise CheckpointError(f"{folder}: incomplete checkpoint (no {COMPLETE_MARKER}: training stopped while "
                                  "writing it); pick another checkpoint or the run folder")
    run_info = _read_json(run_dir / RUN_INFO) if run_dir is not None else None
    kind = _kind(folder)

    base = None
    if not methods.by_kind(kind).WHOLE_MODEL:
        base = _base_model(folder, kind, run_dir, run_info, base_model)
    elif base_model is not None:
        log.warning("%s is a full model: --base-model %s is not used", folder, base_model)
    tokenizer_dir = next((d for d in (folder, base) if d is not None and (d / "tokenizer.model").is_file()), None)
    if tokenizer_dir is None:
        raise CheckpointError(f"{folder}: no tokenizer.model here" + (f" nor in the base model {base}" if base else ""))
    return Checkpoint(folder, kind, base, tokenizer_dir, run_info)


def _kind(folder: Path) -> str:
    kind = methods.kind_of(folder)
    if kind is None:
        raise CheckpointError(
            f"{folder}: holds no model: expected a glm-ft run folder ({RUN_INFO}), a LoRA checkpoint "
            f"({ADAPTER_CONFIG}), a P-Tuning v2 checkpoint ({PREFIX_WEIGHTS}), a freeze-tuning checkpoint "
            f"({freeze.TRAINED_WEIGHTS}) or a model folder (config.json + model.safetensors)")
    return kind


def _base_model(folder: Path, kind: str, run_dir: Path | None, run_info: dict | None,
                override: str | Path | None) -> Path:
    if override is not None:
        base = Path(override).expanduser().resolve()
        if not (base / "config.json").is_file():
            raise CheckpointError(f"--base-model {base}: not a model folder (no config.json)")
        return base
    if run_info is not None and run_info.get("base_model"):
        recorded, source = run_info["base_model"], run_dir / RUN_INFO
    elif methods.by_kind(kind).recorded_base(folder, _read_json):
        recorded, source = methods.by_kind(kind).recorded_base(folder, _read_json), folder / ADAPTER_CONFIG
    else:
        raise CheckpointError(f"{folder}: no base model is recorded for this checkpoint; pass --base-model PATH")
    base = Path(recorded).expanduser()
    if not (base / "config.json").is_file():
        raise CheckpointError(f"{folder}: base model {recorded} (recorded in {source}) not found; "
                              "pass --base-model PATH")
    return base.resolve()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# --- loading -----------------------------------------------------------------------------------------------------


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_checkpoint(path: str | Path | Checkpoint, base_model: str | Path | None = None, *, dtype: str | None = None,
                    device: str | None = None, merge_lora: bool = False) -> Loaded:
    """Tokenizer and model in eval mode on `device` (default: the GPU if there is one). `path` may also be what
    find_checkpoint returned (then base_model is already in it).

    A LoRA adapter stays a PeftModel unless `merge_lora`, which folds it into the base weights; other methods'
    weights are in the model as loaded."""
    ckpt = path if isinstance(path, Checkpoint) else find_checkpoint(path, base_model)
    with long_lived():  # torch, transformers and the model stay for the whole session (glm_ft/heap.py)
        from glm_ft.model import load_base_model, load_tokenizer

        device = device or default_device()
        dtype = methods.torch_dtype(dtype, device=device)
        tokenizer = load_tokenizer(ckpt.tokenizer_dir)
        if ckpt.base_model is None:  # the folder is a whole model
            _check_prefix_weights(ckpt.path)
            model = load_base_model(ckpt.path, dtype)
        else:
            model = methods.by_kind(ckpt.kind).load_onto(load_base_model(ckpt.base_model, dtype), ckpt, merge_lora)
        model.config.use_cache = True  # training switched it off, and an SFT checkpoint saved it that way
        model.to(device).eval()
    log.info("loaded %s", ckpt.describe())
    return Loaded(ckpt, tokenizer, model)


def _check_prefix_weights(folder: Path) -> None:
    # A config with pre_seq_len whose weights lack the prefix would load with a freshly drawn random prefix: the
    # model treats a missing prefix as "new, initialise it", which is right for training and wrong here.
    config = _read_json(folder / "config.json")
    if config.get("pre_seq_len") and PREFIX_TENSOR not in _weight_names(folder):
        raise CheckpointError(f"{folder}: config.json sets pre_seq_len={config['pre_seq_len']} but the weights hold "
                              f"no {PREFIX_TENSOR}")


def _weight_names(folder: Path) -> set[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return set(_read_json(folder / index).get("weight_map", {}))
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", framework="pt") as f:
            return set(f.keys())
    import torch

    try:
        return set(torch.load(folder / "pytorch_model.bin", map_location="meta", weights_only=True, mmap=True))
    except Exception as err:  # an unsafe pickle is refused here, whatever the exact error class
        raise CheckpointError(f"{folder / 'pytorch_model.bin'}: cannot be read as plain tensors "
                              f"({type(err).__name__})") from err


def generation_config(tokenizer, max_new_tokens: int, *, do_sample: bool = False, temperature: float | None = None,
                      top_p: float | None = None):
    """Inference's settings: greedy unless do_sample; stops on eos, <|user|> and <|observation|> as ChatGLM3 does."""
    from glm_ft.train.evaluation import generation_config as build

    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    return build(tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1, use_cache=True,
                 **sampling)


def quiet_transformers() -> None:
    """CLI output is the answer: no weight-loading progress bars or advisory warnings from transformers."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers/peft
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
