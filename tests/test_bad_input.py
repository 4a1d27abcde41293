"""Bad input through the real `train.py`: one line naming the key or FILE:LINE, exit 1, and nothing heavy loaded.

Each run here is a real (not dry) training command that would load the tiny model and train if the input got
through; it runs under a probe that reports, at exit, which heavy modules were imported. "HEAVY []" shows that the
refusal came before torch, transformers, MLflow, ... were even imported, let alone any model weights read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_process

HEAVY = ("torch", "transformers", "peft", "deepspeed", "mlflow", "datasets")
PROBE = (
    "import atexit, sys\n"
    f"atexit.register(lambda: print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    "sys.argv = ['train.py', *sys.argv[1:]]\n"
    "from glm_ft.cli import main\n"
    "main()\n"
)
# Small enough that a value slipping through would end soon instead of training the full quickstart.
SHORT = ["experiment=quickstart", "training_args.max_steps=2", "training_args.eval_steps=2",
         "training_args.save_steps=2", "eval_subset=2"]


def probe_train(args: list[str], tmp_path: Path, cwd: Path = ROOT, **env_set: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", **env_set}
    env.pop("HYDRA_FULL_ERROR", None)
    return run_process([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env)


def assert_refused_light(out: subprocess.CompletedProcess, *expect: str) -> str:
    """Exit 1, exactly one stderr line `error: ...` holding every `expect`, no heavy module imported."""
    assert out.returncode == 1, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for text in expect:
        assert text in lines[0]
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]
    return lines[0]


# --- item 4: every bad value, named by its key, before anything loads ------------------------------------------

GEN = "training_args.generation_config"
# key → bad values (each needs only the overrides given); the key must appear in the message.
BAD_VALUES = {
    f"{GEN}.num_beams": [["0"], ["-2"]],
    f"{GEN}.temperature": [["-1", f"{GEN}.do_sample=true"], ["0", f"{GEN}.do_sample=true"]],
    f"{GEN}.top_p": [["-0.1", f"{GEN}.do_sample=true"], ["1.5", f"{GEN}.do_sample=true"]],
    f"{GEN}.repetition_penalty": [["0"], ["-1"]],
    f"{GEN}.max_new_tokens": [["0"]],
    "seed": [["-1"], [str(2**32)], [str(2**40)]],
    "training_args.learning_rate": [["nan"], ["inf"], ["-1e-3"], ["0"]],
    "training_args.warmup_steps": [["-1"], ["-0.5"], ["nan"]],
    # transformers' own, but they step on eval_loss (not computed: the first evaluation failed)
    "training_args.lr_scheduler_type": [["bogus"], ["Linear"], ["reduce_lr_on_plateau"], ["greedy"]],
    # the chosen scheduler's arguments: a TypeError or ValueError once the model had loaded, or ignored (constant)
    "training_args.lr_scheduler_kwargs": [
        ["{min_lr_rat: 0.1}", "training_args.lr_scheduler_type=cosine_with_min_lr"], ["{num_cycles: 2}"],
        ["{num_cycles: 2}", "training_args.lr_scheduler_type=constant"],
        ["{}", "training_args.lr_scheduler_type=cosine_with_min_lr"],
        ["{min_lr: 1e-5, min_lr_rate: 0.1}", "training_args.lr_scheduler_type=cosine_warmup_with_min_lr"],
        ["{}", "training_args.lr_scheduler_type=warmup_stable_decay"],
        ["{num_decay_steps: 1, decay_type: cos}", "training_args.lr_scheduler_type=warmup_stable_decay"],
        ["{num_cycles: two}", "training_args.lr_scheduler_type=cosine"],
        # out of range, which transformers does not check: a rate rising instead of decaying, a negative floor
        ["{num_cycles: -1}", "training_args.lr_scheduler_type=cosine_with_restarts"],
        ["{min_lr: -1e-5}", "training_args.lr_scheduler_type=cosine_with_min_lr"]],
    # under ZeRO-3, whose config brings DeepSpeed's AdamW: transformers ran that instead, without a word
    "training_args.optim": [["bogus"], ["adamw"], ["adafactor", "deepspeed=zero3"]],
    "training_args.log_level": [["loud"]],
    "training_args.evaluation_strategy": [["sometimes"]],
    "training_args.save_total_limit": [["-1"], ["0"]],
    "training_args.max_grad_norm": [["-1"], ["nan"]],
    "training_args.weight_decay": [["-0.1"]],
    "training_args.adam_beta1": [["1.0"]],
    "training_args.adam_epsilon": [["0"]],
    "tracking.experiment_name": [[""], ["'  '"]],
    "data.pack_max_length": [["16"], ["0"]],
    "eval_batch_tokens": [["0"], ["-1"]],
    # a study's metric, misspelt or without the split it is scored on: refused before training, not after it
    "optimized_metric": [["eval_rougeL"], ["loss"], ["eval_rouge-l", "data.val_file=null"],
                         ["test_bleu-4", "data.test_file=null"]],
    # keeping the best model and early stopping: transformers refused these once the model had loaded, or (its
    # default metric, eval_loss, which the generation-based evaluation never computes) at the first evaluation
    "training_args.metric_for_best_model": [["eval_rougeL", "training_args.load_best_model_at_end=true"],
                                            ["eval_loss", "training_args.load_best_model_at_end=true"], ["loss"],
                                            ["eval_runtime"], ["test_rouge-l"]],
    "training_args.load_best_model_at_end": [["true", "data.val_file=null"],
                                             ["true", "training_args.evaluation_strategy=no"]],
    "training_args.save_strategy": [["epoch", "training_args.load_best_model_at_end=true"]],
    "training_args.save_steps": [["3", "training_args.load_best_model_at_end=true"]],
    "training_args.early_stopping_patience": [["0"], ["2", "data.val_file=null"],
                                              ["2", "training_args.evaluation_strategy=no"]],
    "training_args.early_stopping_threshold": [["-0.5", "training_args.early_stopping_patience=2"]],
    # glm_ft/methods/: the LoRA variants' and freeze tuning's values
    "method.init_lora_weights": [["pisa", "method=lora"], ["eva", "method=lora"], ["pissa_niter_x", "method=lora"],
                                 ["pissa", "method=lora", "method.use_dora=true"],
                                 ["olora", "method=lora", "deepspeed=zero3"]],
    "method.loraplus_lr_ratio": [["0", "method=lora"], ["-1", "method=lora"], ["inf", "method=lora"],
                                 ["16", "method=lora", "deepspeed=zero3"]],
    "method.target_modules": [["[nope]", "method=lora"], ["['']", "method=lora"],
                              ["[query_key_value,qkv]", "method=lora"]],
    "method.num_trainable_layers": [["-1", "method=freeze"], ["0", "method=freeze"]],
    "method.trainable_modules": [["[' ']", "method=freeze"]],
    "deepspeed": [["zero3", "method=freeze"]],
    # a switch: the typed config would read any number or word as true
    "method.use_dora": [["2", "method=lora"], ["yes", "method=lora"]],
    "training_args.bf16": [["0"], ["on"]],
    # documented keys glm-ft sets itself: another value was ignored, or broke the first evaluation
    "training_args.output_dir": [["/tmp/elsewhere"]],
    "training_args.deepspeed": [["/tmp/ds_zero_3.json"]],
    "training_args.remove_unused_columns": [["true"]],
    "training_args.predict_with_generate": [["false"]],
    # too short to hold [gMASK] sop and a token: found when tokenizing, after the MLflow run started
    "max_input_length": [["2"], ["0"]],
    "max_output_length": [["0"]],
}
BAD_CASES = [(key, [f"{key}={value}", *extra]) for key, values in BAD_VALUES.items() for value, *extra in values]


@pytest.mark.parametrize("key, args", BAD_CASES, ids=[" ".join(a) for _, a in BAD_CASES])
def test_bad_value_fails_naming_the_key_before_anything_loads(key, args, tmp_path):
    run_dir = tmp_path / "run"
    out = probe_train([*SHORT, *args, f"hydra.run.dir={run_dir}"], tmp_path)
    line = assert_refused_light(out, key)
    assert "Traceback" not in out.stderr and line.startswith(f"error: {key}")
    assert not (run_dir / "finetune.yaml").exists()  # nothing rendered, nothing half-written


@pytest.mark.parametrize("args", [["hparams_search=lora_optuna", "optimized_metric=eval_rougeL"],
                                  ["-m", "method=lora", "method.r=4,8", "optimized_metric=eval_rouge-l", "data.val_file=null"]])
def test_a_sweeps_metric_is_refused_before_the_sweep_starts(args, tmp_path):
    """Each job of a sweep would refuse it only once the sweep had started (its MLflow parent run made, every trial
    failing in turn, Hydra's report of failed trials): one line before anything."""
    sweep_dir = tmp_path / "sweep"
    out = probe_train([*SHORT, *args, f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert_refused_light(out, "optimized_metric")
    assert not sweep_dir.exists() and not (tmp_path / "mlflow.db").exists()


# --- item 5: data before weights --------------------------------------------------------------------------------

CONVERSATION = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好"}]}


def data_dir_with(tmp_path: Path, name: str, text: str | None = None) -> list[str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    if text is not None:
        (data / name).write_text(text, encoding="utf-8")
    return [f"data.data_dir={data}", f"data.train_file={name}", "data.val_file=null", "data.test_file=null"]


def test_bad_data_fails_with_file_and_line_before_the_model_loads(tmp_path):
    good = json.dumps(CONVERSATION, ensure_ascii=False)
    args = data_dir_with(tmp_path, "train.jsonl", f"{good}\n{good}\n{{\"conversations\": [{{\"role\": \"bot\"}}\n")
    out = probe_train([*SHORT, *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_refused_light(out, f"{tmp_path / 'data' / 'train.jsonl'}:3: malformed JSON")
    unknown_role = good.replace('"user"', '"bot"')
    args = data_dir_with(tmp_path, "train.jsonl", f"{good}\n{unknown_role}\n")
    out = probe_train([*SHORT, *args, f"hydra.run.dir={tmp_path / 'run2'}"], tmp_path)
    assert_refused_light(out, f"{tmp_path / 'data' / 'train.jsonl'}:2: message 1 has unknown role 'bot'")


# --- item 6: refused input is one line, never a traceback -------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def _tools_row(tools) -> str:
    return json.dumps({"conversations": [{"role": "system", "content": "s", "tools": tools}, *CONVERSATION[
        "conversations"]]})


def _function_call_row(value: str) -> str:
    """A sharegpt row (LLaMA-Factory's layout) whose tool call is `value`."""
    return json.dumps({"conversations": [{"from": "human", "value": "北京天气?"},
                                         {"from": "function_call", "value": value},
                                         {"from": "observation", "value": "22"}, {"from": "gpt", "value": "22 度"}]})


@pytest.mark.parametrize("name, text, expect", [
    ("train.jsonl", json.dumps(CONVERSATION) + "\n" + json.dumps(CONVERSATION, ensure_ascii=False).replace(
        '"好"', '"\\ud800"') + "\n",
     ":2: content of message 2 (assistant) holds '\\ud800'"),
    ("train.jsonl", json.dumps(CONVERSATION) + "\n" + DEEP + "\n", ":2: JSON nested too deeply"),
    ("train.json", "[" + json.dumps(CONVERSATION) + ",\n" + DEEP + "]", ":2: JSON nested too deeply"),
    ("train.jsonl", _tools_row(["get_weather"]) + "\n", ":1: tools of message 1 must be a list of objects"),
    ("train.jsonl", _tools_row({"name": "get_weather"}) + "\n", ":1: tools of message 1 must be a list of objects"),
    # read on, the row would train without its system prompt
    ("train.jsonl", json.dumps({"system": "Be brief.", **CONVERSATION}) + "\n",
     ":1: 'system' belongs in a system message (the first of 'conversations'), not on the row"),
    # read on, the model would learn to call tools in a form serve's tool-call parser never reads
    ("train.json", "[\n" + _function_call_row("get_weather") + "\n]",
     ":2: sharegpt message 2 (function_call) is not JSON"),
    ("train.jsonl", _function_call_row('{"name": ["get_weather"], "arguments": {}}') + "\n",
     ":1: sharegpt message 2 (function_call) has no string 'name'"),
    ("train.jsonl", _function_call_row('{"name": "get_weather", "arguments": "city=北京"}') + "\n",
     ":1: sharegpt message 2 (function_call): 'arguments' is not a JSON object (or one in a string)"),
], ids=["surrogate", "deep-jsonl", "deep-json-array", "tools-strings", "tools-object", "row-system",
        "call-not-json", "call-name", "call-arguments"])
def test_refused_data_rows_are_one_line(name, text, expect, tmp_path):
    args = data_dir_with(tmp_path, name, text)
    out = probe_train([*SHORT, *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_refused_light(out, f"{tmp_path / 'data' / name}{expect}")


def test_unreadable_directory_and_fifo_data_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # A real EIO from the kernel: reading /proc/self/mem at offset 0 (an unmapped address) fails with EIO.
    (data / "eio.jsonl").symlink_to("/proc/self/mem")
    (data / "folder.jsonl").mkdir()
    os.mkfifo(data / "pipe.jsonl")  # reading it would block forever: refused without opening it
    cases = {"eio.jsonl": "cannot read the file (Input/output error)",
             "folder.jsonl": "data.train_file: '{path}' is a directory, not a data file",
             "pipe.jsonl": "data.train_file: '{path}' is a named pipe (FIFO), not a data file"}
    for name, expect in cases.items():
        path = data / name
        args = [f"data.data_dir={data}", f"data.train_file={name}", "data.val_file=null", "data.test_file=null"]
        out = probe_train([*SHORT, *args, f"hydra.run.dir={tmp_path / name}"], tmp_path)
        assert_refused_light(out, str(path), expect.format(path=path))


@pytest.mark.parametrize("args, expect", [
    (["hydra.run.dir=/proc/glm-ft-x"], "error: hydra.run.dir: cannot create '/proc/glm-ft-x' (No such file"),
    # empty: Hydra would make the folder it was started from the run folder
    (["hydra.run.dir="], "error: hydra.run.dir: empty; name a folder for the run"),
    (["seed=${nope}"], "error: seed: Interpolation key 'nope' not found"),
    (["training_args.max_steps=${training_args.eval_steps}", "training_args.eval_steps=${training_args.max_steps}"],
     "Recursive interpolation detected"),
    (["tracking.run_name=${tracking.experiment_name}", "tracking.experiment_name=${tracking.run_name}"],
     "Recursive interpolation detected"),
    # the metric's close names, and why the loss is no choice
    (["training_args.metric_for_best_model=eval_rougeL", "training_args.load_best_model_at_end=true"],
     "error: training_args.metric_for_best_model: 'eval_rougeL' is not a metric glm-ft's evaluation reports (did you "
     "mean eval_rouge-1 or eval_rouge-2 or eval_rouge-l?)"),
    (["training_args.metric_for_best_model=eval_loss", "training_args.early_stopping_patience=2"],
     "eval_loss is not computed: glm-ft evaluates by generating replies and scoring them, with no loss"),
    (["training_args.save_steps=3", "training_args.load_best_model_at_end=true"],
     "error: training_args.save_steps: must be a multiple of training_args.eval_steps (3 vs 2)"),
])
def test_config_refusals_are_one_line(args, expect, tmp_path):
    run_dir = [] if any(a.startswith("hydra.run.dir") for a in args) else [f"hydra.run.dir={tmp_path / 'run'}"]
    out = probe_train([*SHORT, *args, *run_dir], tmp_path)
    assert_refused_light(out, expect)
    assert not Path("/proc/glm-ft-x").exists()


@pytest.mark.parametrize("uri, expect", [
    ("bogus://x", "'bogus://x' is not a tracking URI MLflow opens"),
    ("notauri", "'notauri' is a folder store, which MLflow 3 refuses"),
    ("file:///tmp/glm-ft-folder-store", "'file:///tmp/glm-ft-folder-store' is a folder store"),
    ("sqlite:///", "'sqlite:///' names no database file"),
    ("sqlite:///{tmp}/not-a-db.txt", "{tmp}/not-a-db.txt is not an SQLite database"),
    ("sqlite:///{tmp}", "{tmp} is a folder, not an SQLite database file"),
    ("http://127.0.0.1:1", "MLflow tracking server http://127.0.0.1:1 is unreachable"),
])
def test_a_bad_tracking_store_is_one_line_before_anything_loads(uri, expect, tmp_path):
    """Through MLFLOW_TRACKING_URI (which wins over tracking.tracking_uri) and the key itself."""
    (tmp_path / "not-a-db.txt").write_text("notes\n")
    uri, expect = uri.format(tmp=tmp_path), expect.format(tmp=tmp_path)
    run_dir = tmp_path / "run"
    out = probe_train([*SHORT, f"hydra.run.dir={run_dir}"], tmp_path, MLFLOW_TRACKING_URI=uri)
    assert_refused_light(out, f"error: MLFLOW_TRACKING_URI: {expect}")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = run_process([sys.executable, "-c", PROBE, *SHORT, f"tracking.tracking_uri={uri}",
                       f"hydra.run.dir={run_dir}"], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
    assert_refused_light(out, f"error: tracking.tracking_uri: {expect}")
    assert not (run_dir / "finetune.yaml").exists() and not Path("/tmp/glm-ft-folder-store").exists()


def test_a_failed_sweep_job_prints_its_line_not_a_traceback(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.jsonl").write_text(json.dumps(CONVERSATION) + "\n", encoding="utf-8")
    (data / "bad.jsonl").write_text(json.dumps(CONVERSATION) + "\n{oops\n", encoding="utf-8")
    out = probe_train(["-m", *SHORT, "dry_run=true", f"data.data_dir={data}", "data.train_file=good.jsonl,bad.jsonl",
                       "data.val_file=null", "data.test_file=null", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                      tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    # The sweep ends with a line per failed job (its swept value, its error) and the count, not a traceback.
    assert "Traceback" not in out.stderr and 'File "' not in out.stderr
    assert f"job #1 (data.train_file=bad.jsonl): {data / 'bad.jsonl'}:2: malformed JSON (Expecting property name " \
        "enclosed in double quotes, column 2); expected one JSON object per line or one JSON array" \
        in out.stderr.splitlines()
    assert "error: 1 of 2 jobs failed" in out.stderr.splitlines()
    assert (tmp_path / "sweep" / "0" / "finetune.yaml").is_file()  # the good job ran
    assert not (tmp_path / "sweep" / "1" / "finetune.yaml").exists()


# --- item 10: no silent surprises -------------------------------------------------------------------------------

def test_a_missing_model_path_is_never_built_into_a_random_model(tmp_path):
    where = tmp_path / "some" / "where"
    out = probe_train([*SHORT, f"model.path={where}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_refused_light(out, f"model.path: '{where}' does not exist", "model.path=/models/chatglm3-6b")
    assert not where.exists() and not where.parent.exists()


def test_resume_auto_needs_an_existing_run_folder(tmp_path):
    missing = tmp_path / "never-ran"
    out = probe_train([*SHORT, "resume=auto", f"hydra.run.dir={missing}"], tmp_path)
    assert_refused_light(out, f"resume=auto: the run folder '{missing}' (hydra.run.dir) does not exist")
    assert not missing.exists()  # refused before Hydra created it
    # Without hydra.run.dir Hydra makes a fresh timestamped folder: nothing to resume there either.
    out = probe_train([*SHORT, "resume=auto"], tmp_path, cwd=tmp_path)
    line = assert_refused_light(out, "resume=auto: '", "holds no earlier run")
    (fresh,) = list(tmp_path.glob("outputs/*/*"))
    assert str(fresh) in line and not (fresh / "finetune.yaml").exists()


@pytest.mark.parametrize("args, expect", [
    (["method=lora", "method.rank=8"], "unknown key 'method.rank' (did you mean method.r?)"),
    (["training_args.max_step=10"], "unknown key 'training_args.max_step' (did you mean training_args.max_steps?)"),
    (["max_steps=10"], "unknown key 'max_steps' (did you mean training_args.max_steps?)"),
    ([f"{GEN}.num_beam=2"], f"unknown key '{GEN}.num_beam' (did you mean {GEN}.num_beams?)"),
    (["data.train=x.jsonl"], "unknown key 'data.train' (did you mean data.train_file?)"),
    (["method=ptuning_v2", "method.r=4"], "method.r: method=ptuning_v2 has no key 'r' (it belongs to method=lora)"),
    # the reference demo's section names, and a misspelt section above a valid key
    (["method=lora", "peft_config.r=4"], "unknown key 'peft_config.r': the documented peft_config is glm-ft's method (did you mean "
                          "method.r?)"),
    (["data_config.train_file=x.jsonl"], "(did you mean data.train_file?)"),
    (["method=lora", "peft_config.rank=8"], "the documented peft_config is glm-ft's method, and unknown key "
                                            "'method.rank' (did you mean method.r?)"),
    (["training_args.generation_configg.max_new_tokens=4"],
     "unknown key 'training_args.generation_configg' (did you mean training_args.generation_config?)"),
    (["-m", "method=lora,ptuning_v2", "method.r=4,8"], "method=ptuning_v2 has no key 'r'"),
    # group options: one line, not Hydra's list of options and search path (or its traceback for null)
    (["experiment=quickstrat"], "experiment=quickstrat: no such experiment; choose one of demo_sweep, quickstart"),
    (["data=nope"], "data=nope: no such data; choose one of advertise_gen, sample"),
    (["deepspeed=zero4"], "deepspeed=zero4: no such deepspeed; choose one of zero2, zero3"),
    (["deepspeed=null"], "deepspeed=null: choose one of zero2, zero3, or drop the group with ~deepspeed"),
    (["model=null"], "model=null: choose one of chatglm3_6b, tiny, tiny_demo"),
    (["-m", "method=lora,lorra"], "method=lorra: no such method"),
    # a DeepSpeed key with no DeepSpeed config composed (the quickstart drops sft's zero3)
    (["method=lora", "deepspeed.zero_optimization.stage=2"],
     "deepspeed.zero_optimization.stage: no DeepSpeed config is chosen; add deepspeed=zero2 or deepspeed=zero3"),
    (["method=sft", "deepspeed.train_batch_size=8"], "deepspeed.train_batch_size: no DeepSpeed config is chosen"),
    # a key the chosen DeepSpeed file lacks (Hydra's "+" hint would write a misspelt one into ds_config.json)
    (["method=sft", "deepspeed=zero3", "deepspeed.zero_optimization.stage3_max_live_parameter=5e8"],
     "deepspeed.zero_optimization.stage3_max_live_parameter: conf/deepspeed/zero3.yaml has no key "
     "'stage3_max_live_parameter' under deepspeed.zero_optimization (did you mean "
     "deepspeed.zero_optimization.stage3_max_live_parameters"),
    (["method=sft", "deepspeed=zero3", "deepspeed.bf16.enable=true"],
     "deepspeed.bf16.enable: conf/deepspeed/zero3.yaml has no key 'enable' under deepspeed.bf16 (did you mean "
     "deepspeed.bf16.enabled?)"),
    # wrong types: one line, not Hydra's merge error over half a dozen
    (["method=lora", "method.r=abc"], "method.r: expected an integer, got 'abc'"),
    (["seed=1e3"], "seed: expected an integer, got '1e3'"),
    (["max_input_length=1.5"], "max_input_length: expected an integer, got '1.5'"),
    (["training_args.learning_rate=fast"], "training_args.learning_rate: expected a number, got 'fast'"),
    (["training_args=foo"], "training_args: is a section, not a value; set its keys (training_args.NAME=...)"),
    (["model.path=null"], "model.path: may not be null"),
    (["~training_args.max_steps"], "~training_args.max_steps: a schema key can't be removed"),
])
def test_misspelt_keys_get_the_closest_valid_ones(args, expect, tmp_path):
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags come before the overrides
    folders = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 's'}"]
    out = probe_train([*flags, *SHORT, *[a for a in args if a not in flags], *folders], tmp_path)
    assert_refused_light(out, expect)
    assert "+" not in out.stderr  # not Hydra's "To append to your config use +..."
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("args", [["hydra/launcher=joblib_gpus", "--cfg", "job"], ["--cfg", "job", "+seed2=1"],
                                  ["-m", "method.r=4,8", "--cfg", "job"], ["deepspeed=zero2", "--cfg", "job"],
                                  ["deepspeed=zero2", "deepspeed.zero_optimization.stage=2", "--cfg", "job"],
                                  ["hparams_search=lora_optuna", "--cfg", "job"],
                                  ["-m", "method.use_dora=true,false", "--cfg", "job"],
                                  ["training_args.bf16=False", "--cfg", "job"],
                                  ["experiment=demo_sweep", "deepspeed=zero2", "deepspeed.train_batch_size=8",
                                   "--cfg", "job"],
                                  ["deepspeed=zero3", "+deepspeed.gradient_clipping=1.0", "--cfg", "job"],
                                  ["~deepspeed", "experiment=demo_sweep", "--cfg", "job"],
                                  ["eval_subset=null", "training_args.learning_rate=1", "method.lora_dropout=0",
                                   "seed=${max_input_length}", "--cfg", "job"],
                                  ["data=sample", "model=tiny", "--cfg", "job"]])
def test_valid_command_lines_pass_the_key_check(args, tmp_path):
    flags = [a for a in args if a.startswith("-") or a == "job"]
    out = probe_train([*flags, "method=lora", *[a for a in args if a not in flags]], tmp_path)
    assert "unknown key" not in out.stderr and "has no key" not in out.stderr, out.stderr[-2000:]


OWN_EXPERIMENTS = {  # a user's --config-dir: files as the README shows them
    "base": "# @package _global_\ndefaults:\n  - quickstart\n  - override /method: ptuning_v2\n"
            "method:\n  num_virtual_tokens: 4\n",
    "extends": "# @package _global_\ndefaults:\n  - base\n\nmethod:\n  num_virtual_tokens: 8\n",  # inherits the method
    "typo": "# @package _global_\ndefaults:\n  - quickstart\ntraining_args:\n  max_step: 10\n",
    "other_method": "# @package _global_\ndefaults:\n  - quickstart\n  - override /method: ptuning_v2\n"
                    "method:\n  r: 4\n",
}


@pytest.mark.parametrize("name, expect", [
    ("typo", "experiment/typo.yaml:5: unknown key 'training_args.max_step' (did you mean training_args.max_steps?)"),
    ("other_method", "experiment/other_method.yaml:6: method.r: method=ptuning_v2 has no key 'r' (it belongs to "
                     "method=lora)"),
])
def test_a_misspelt_key_in_a_config_file_of_ones_own_is_one_line_naming_its_line(name, expect, tmp_path):
    """Hydra refused these over half a dozen lines, naming neither the line nor the close names."""
    own = tmp_path / "mine" / "experiment"
    own.mkdir(parents=True)
    for stem, text in OWN_EXPERIMENTS.items():
        (own / f"{stem}.yaml").write_text(text)
    out = probe_train(["--config-dir", str(tmp_path / "mine"), f"experiment={name}", "dry_run=true",
                       f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_refused_light(out, expect)
    (own / "quickstart.yaml").write_text(OWN_EXPERIMENTS["typo"])  # Hydra takes the shipped one of a name first
    # swept among others: each file is checked
    out = probe_train(["-m", "--config-dir", str(tmp_path / "mine"), f"experiment=base,{name}", "dry_run=true",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert_refused_light(out, expect if name == "typo" else f"experiment/{name}.yaml:6: ")
    for good in ("base", "extends", "quickstart"):  # a file's own or inherited choice of method is not second-guessed
        out = probe_train([f"--config-dir={tmp_path / 'mine'}", f"experiment={good}", "dry_run=true",
                           f"hydra.run.dir={tmp_path / good}"], tmp_path)
        assert out.returncode == 0 and "dry run: config is valid" in out.stdout, out.stderr[-3000:]


def test_deepspeed_keys_from_a_files_defaults_or_an_experiment_are_not_refused(tmp_path):
    """Only Hydra knows every key when the chosen DeepSpeed file takes others' or an experiment adds some."""
    (tmp_path / "mine" / "deepspeed").mkdir(parents=True)
    (tmp_path / "mine" / "experiment").mkdir()
    (tmp_path / "mine" / "deepspeed" / "mine.yaml").write_text(
        "defaults:\n  - zero3\n  - _self_\nzero_optimization:\n  stage3_max_live_parameters: 1e8\n")
    (tmp_path / "mine" / "experiment" / "offload.yaml").write_text(
        "# @package _global_\ndefaults:\n  - quickstart\n  - override /method: sft\n  - override /deepspeed: zero3\n"
        "deepspeed:\n  zero_optimization:\n    offload_optimizer:\n      device: cpu\n")
    for i, args in enumerate((["experiment=quickstart", "deepspeed=mine", "method=sft",
                               "deepspeed.train_micro_batch_size_per_gpu=auto"],
                              ["experiment=offload", "deepspeed.zero_optimization.offload_optimizer.device=none"])):
        out = probe_train(["--config-dir", str(tmp_path / "mine"), *args, *SHORT[1:], "dry_run=true",
                           f"hydra.run.dir={tmp_path / f'run{i}'}"], tmp_path)
        assert out.returncode == 0 and "dry run: config is valid" in out.stdout, out.stderr[-3000:]


def test_a_deepspeed_key_the_chosen_file_lacks_is_added_with_a_plus(tmp_path):
    out = probe_train([*SHORT, "method=sft", "deepspeed=zero3", "deepspeed.gradient_clipping=0.5",
                       f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_refused_light(out, "deepspeed.gradient_clipping: conf/deepspeed/zero3.yaml has no key 'gradient_clipping' "
                              "under deepspeed (a DeepSpeed key it does not set is added with "
                              "+deepspeed.gradient_clipping=...)")


@pytest.mark.parametrize("args, expect", [
    (["method=sft", "model.torch_dtype=float16"],
     "error: model.torch_dtype: float16 with method=sft trains the weights themselves in fp16, with no fp32 master"),
    (["method=freeze", "model.torch_dtype=float16"], "error: model.torch_dtype: float16 with method=freeze"),
    # refused on any machine: the fp16 check of training_args, which asks for a GPU, comes after it
    (["method=sft", "model.torch_dtype=bfloat16", "training_args.fp16=true"],
     "error: model.torch_dtype: bfloat16 with training_args.fp16=true: method=sft would train bf16 weights"),
    (["method=sft", "deepspeed=zero3", "model.torch_dtype=bfloat16"],
     "error: model.torch_dtype: bfloat16 under DeepSpeed needs training_args.bf16=true"),
])
def test_a_dtype_the_method_cannot_train_in_is_one_line_before_anything_loads(args, expect, tmp_path):
    """Methods that train base weights: glm-ft upcast them to fp32 whatever model.torch_dtype said."""
    out = probe_train([*SHORT, *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_refused_light(out, expect)


def test_a_zero_key_deepspeed_does_not_have_is_one_line_before_anything_loads(tmp_path):
    """Added with `+`, past the file's keys: held against DeepSpeed's own model, read from its source."""
    out = probe_train([*SHORT, "method=sft", "deepspeed=zero3", "+deepspeed.zero_optimization.stage3_max_live_parameter=5e8",
                       f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert_refused_light(out, "deepspeed.zero_optimization.stage3_max_live_parameter: DeepSpeed has no such ZeRO key "
                              "(did you mean deepspeed.zero_optimization.stage3_max_live_parameters")


@pytest.mark.parametrize("args, expect", [
    (["deepspeed.zero_optimization.overlap_comm=maybe"],
     "deepspeed.zero_optimization.overlap_comm: Input should be a valid boolean"),
    (["+deepspeed.zero_optimization.offload_optimizer.device=gpu"],
     "deepspeed.zero_optimization.offload_optimizer.device: Input should be 'none', 'cpu' or 'nvme', got 'gpu'"),
])
def test_a_zero_value_deepspeed_would_refuse_is_one_line_before_the_model_loads(args, expect, tmp_path):
    """DeepSpeed's own model of the section judges it (it refused these inside deepspeed.initialize, after the
    model loaded), where the run imports deepspeed: nothing loads, and no MLflow run is made."""
    out = probe_train([*SHORT, "method=sft", "deepspeed=zero3", *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], out.stderr[-3000:]
    assert "'transformers'" not in out.stdout and "'datasets'" not in out.stdout, out.stdout[-2000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "run" / "finetune.yaml").exists()


# --- refused weights: the model folder's files, with a real (heavy) run ---------------------------------------

class _Payload:
    """Pickled as a call to os.system: what weights_only=True must refuse to run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from glm_ft.chatglm3.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-chatglm3")


def _copy_model(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.mark.slow
def test_refused_pickle_and_damaged_safetensors_are_one_line(tiny_folder, tmp_path):
    import struct

    import torch

    marker = tmp_path / "payload-ran"
    pickled = _copy_model(tiny_folder, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save({"transformer.embedding.word_embeddings.weight": _Payload(marker)}, pickled / "pytorch_model.bin")
    damaged = _copy_model(tiny_folder, tmp_path / "damaged")
    weights = damaged / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[:8] = struct.pack("<Q", 2**40)  # the header length: now far past the end of the file
    weights.write_bytes(bytes(raw))

    cases = {pickled: "refused a pickled weights file, loaded with weights_only=True: Trying to load unsupported "
                      "GLOBAL posix.system",
             damaged: "damaged safetensors file (Error while deserializing header: header too large)"}
    for folder, expect in cases.items():
        run_dir = tmp_path / f"run-{folder.name}"
        out = probe_train([*SHORT, "method=lora", f"model.path={folder}", f"hydra.run.dir={run_dir}"], tmp_path)
        assert out.returncode == 1, out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {folder}: {expect}"), out.stderr[-3000:]
        # Data before weights: the data was read and tokenized before the weights were opened.
        assert "train: " in out.stdout + out.stderr and "rows read" in out.stdout + out.stderr
    assert not marker.exists()  # the pickled call never ran
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("glm-ft").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}


def lora_run_with_one_checkpoint(tmp_path: Path) -> Path:
    """A real tiny LoRA run folder with its checkpoint-1 (one step, no evaluation)."""
    source = tmp_path / "source"
    out = probe_train([*SHORT, "method=lora", "training_args.max_steps=1", "training_args.save_steps=1",
                       "training_args.evaluation_strategy=no", "data.test_file=null", f"hydra.run.dir={source}"],
                      tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return source


@pytest.mark.slow
def test_a_wrong_resume_folder_is_one_line_before_anything_loads(tmp_path):
    """A run folder, another method's checkpoint, a folder that is no checkpoint: refused by the config check,
    not after the model loaded (a traceback from the optimizer's state, for another method's checkpoint)."""
    source = lora_run_with_one_checkpoint(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["method=lora", f"resume={source}"], f"resume: '{source}' is a run folder, not one of its checkpoints; "
              f"use resume=auto hydra.run.dir={source}, or resume={source}/checkpoint-N"),
             (["method=sft", f"resume={source / 'checkpoint-1'}"],
              f"resume: '{source / 'checkpoint-1'}' holds a checkpoint of method=lora (LoRA adapter); this run is "
              "method=sft"),
             (["method=lora", f"resume={empty}"], f"resume: '{empty}' is not a complete glm-ft checkpoint")]
    for args, expect in cases:
        run_dir = tmp_path / "run"
        out = probe_train([*SHORT, *args, f"hydra.run.dir={run_dir}", "training_args.max_steps=3"], tmp_path)
        assert_refused_light(out, expect)
        assert not (run_dir / "finetune.yaml").exists()
    # the right method's checkpoint passes the check (and trains on to step 3)
    out = probe_train([*SHORT, "method=lora", f"resume={source / 'checkpoint-1'}", "training_args.max_steps=3",
                       "training_args.evaluation_strategy=no", "data.test_file=null",
                       f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_refused_files_in_a_resume_checkpoint_are_one_line(tmp_path):
    import shutil
    import struct

    import torch

    source = lora_run_with_one_checkpoint(tmp_path)
    marker = tmp_path / "payload-ran"
    pickled = shutil.copytree(source / "checkpoint-1", tmp_path / "pickled" / "checkpoint-1")
    torch.save({"state": _Payload(marker)}, pickled / "optimizer.pt")
    damaged = shutil.copytree(source / "checkpoint-1", tmp_path / "damaged" / "checkpoint-1")
    raw = bytearray((damaged / "adapter_model.safetensors").read_bytes())
    raw[:8] = struct.pack("<Q", 2**40)
    (damaged / "adapter_model.safetensors").write_bytes(bytes(raw))

    for checkpoint, expect in ((pickled, "refused a pickled weights file, loaded with weights_only=True: "),
                               (damaged, "damaged safetensors file (")):
        out = probe_train([*SHORT, "method=lora", "training_args.max_steps=2", f"resume={checkpoint}",
                           f"hydra.run.dir={tmp_path / ('run-' + checkpoint.parent.name)}"], tmp_path)
        assert out.returncode == 1, out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: resume: {checkpoint}: {expect}"), \
            out.stderr[-3000:]
    assert not marker.exists()
