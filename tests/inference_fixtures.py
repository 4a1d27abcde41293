"""What the inference tests start from, built once per test session and shared by test_checkpoint, test_chat,
test_predict and test_export:

- real run folders of `python train.py` at tiny size, one per method (2 steps, no evaluation: only what they save
  matters here; a high learning rate so that the adapter really changes the model);
- a P-Tuning v2 checkpoint laid out as the reference demo saved it (a whole model with `pre_seq_len`);
- a tiny ChatGLM3 of another shape, to load adapters onto the wrong model.

Import the fixtures into a test module: `from inference_fixtures import runs, ...  # noqa: F401`. A pytest
fixture imported into several modules is set up once per module, so the results are also cached here.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from glm_ft import chatglm3
from conftest import run_train

TRAIN_ARGS = ["experiment=quickstart", "training_args.max_steps=2", "training_args.save_steps=2",
              "training_args.learning_rate=1e-2", "training_args.warmup_steps=0", "data.val_file=null",
              "data.test_file=null", "tracking.enabled=false"]
METHODS = {"lora": ["method=lora"], "ptuning_v2": ["method=ptuning_v2", "method.num_virtual_tokens=4"],
           "sft": ["method=sft"]}
REFERENCE_PREFIX_TOKENS = 3

chatglm3.register()  # the fixtures and their tests load folders through transformers' Auto classes

_cache: dict[str, object] = {}


def _once(key: str, build):
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]


def train(run_dir: Path, *args: str) -> Path:
    result = run_train([*TRAIN_ARGS, *args, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """method name -> run folder (glm_ft_run.json, checkpoint-2/, final/)."""

    def build() -> dict[str, Path]:
        # Side by side: each run is mostly start-up (imports), which one core serves as well as two.
        with ThreadPoolExecutor(len(METHODS)) as pool:
            futures = {name: pool.submit(train, tmp_path_factory.mktemp(f"run_{name}"), *args)
                       for name, args in METHODS.items()}
            return {name: future.result() for name, future in futures.items()}

    return _once("runs", build)


@pytest.fixture(scope="session")
def base_dir(runs) -> Path:
    """The tiny base model the runs were trained on, as they recorded it."""
    return Path(json.loads((runs["lora"] / "glm_ft_run.json").read_text())["base_model"])


def save_model_folder(model, tokenizer, out: Path, config: dict) -> Path:
    """A model folder as the published checkpoints are: config.json in the original layout, no generation config."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def reference_ptuning_dir(tmp_path_factory, base_dir) -> Path:
    """What the reference demo saved for P-Tuning v2: the whole model, config.json with pre_seq_len and
    prefix_projection, transformer.prefix_encoder.embedding.weight among the weights."""

    def build() -> Path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from glm_ft.chatglm3.prefix import enable_ptuning_v2
        from glm_ft.chatglm3.tiny import TINY_CONFIG

        model = enable_ptuning_v2(AutoModelForCausalLM.from_pretrained(base_dir), REFERENCE_PREFIX_TOKENS, seed=7)
        config = {**TINY_CONFIG, "pre_seq_len": REFERENCE_PREFIX_TOKENS, "prefix_projection": False}
        return save_model_folder(model, AutoTokenizer.from_pretrained(base_dir),
                                 tmp_path_factory.mktemp("reference_ptuning"), config)

    return _once("reference_ptuning", build)


@pytest.fixture(scope="session")
def other_shape_dir(tmp_path_factory, base_dir) -> Path:
    """A tiny ChatGLM3 with another hidden size and layer count than the runs' base model."""

    def build() -> Path:
        import torch
        from transformers import AutoTokenizer

        from glm_ft.chatglm3.configuration import ChatGLMConfig
        from glm_ft.chatglm3.modeling import ChatGLMForConditionalGeneration
        from glm_ft.chatglm3.tiny import TINY_CONFIG

        config = {**TINY_CONFIG, "hidden_size": 32, "num_layers": 3, "kv_channels": 8, "ffn_hidden_size": 80}
        torch.manual_seed(0)
        model = ChatGLMForConditionalGeneration(ChatGLMConfig.from_dict(config))
        return save_model_folder(model, AutoTokenizer.from_pretrained(base_dir),
                                 tmp_path_factory.mktemp("other_shape"), config)

    return _once("other_shape", build)


def greedy_reply(model, tokenizer, query: str, history: list[dict] | None = None, max_new_tokens: int = 12) -> str:
    """Greedy generation by hand with ChatGLM3's own API: build_chat_input, generate, cut at a stop token."""
    import torch

    inputs = tokenizer.build_chat_input(query, history=history or [])
    stops = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    cut = next((i for i, tok in enumerate(new) if tok in stops), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True).strip()


def load_by_hand(run_dir: Path, base_dir: Path):
    """A run's final model loaded with the libraries directly (not glm_ft.infer.checkpoint): tokenizer, model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = json.loads((run_dir / "glm_ft_run.json").read_text())["method"]["name"]
    final = run_dir / "final"
    if method == "sft":
        return AutoTokenizer.from_pretrained(final), AutoModelForCausalLM.from_pretrained(final).eval()
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, final)
    elif method == "freeze":  # the trained tensors in place of the base model's
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(final / "trained_weights.safetensors"), strict=False)
        assert not unexpected
    else:
        from glm_ft.chatglm3.prefix import load_prefix

        model = load_prefix(model, final)
    return AutoTokenizer.from_pretrained(base_dir), model.eval()
