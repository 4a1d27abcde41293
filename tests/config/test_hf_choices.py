"""glm-ft's light checks of Trainer and generation values hold to what transformers itself does.

Validation can't import transformers (a dry run loads nothing heavy), so the Trainer enums are read from transformers'
source (glm_ft.config.hf_choices) and the generation ranges are written in glm_ft.config.validate. These tests import
the real thing and hold both to it: the enums equal, and every generation value transformers' generate() refuses is
refused by glm-ft, every value glm-ft accepts generates.
"""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT, compose, run_process
from glm_ft.config import hf_choices
from glm_ft.errors import ConfigError
from glm_ft.config.validate import UNRUNNABLE_SCHEDULERS, validate


def test_enums_equal_transformers_own():
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
    from transformers.training_args import OptimizerNames, trainer_log_levels

    for enum in (IntervalStrategy, SaveStrategy, SchedulerType, OptimizerNames):
        assert hf_choices.enum_values(enum.__name__) == tuple(member.value for member in enum)
    assert set(hf_choices.log_levels()) == set(trainer_log_levels)


def test_reading_the_enums_imports_nothing_heavy():
    """hf_choices locates transformers and DeepSpeed without importing them (a dry run must stay light)."""
    code = ("import sys; from glm_ft.config import hf_choices; hf_choices.enum_values('OptimizerNames');"
            "hf_choices.zero_config_keys();"
            "print('HEAVY', [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules])")
    out = run_process([sys.executable, "-c", code], cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout


GEN = "training_args.generation_config"
# Values on both sides of each bound glm-ft checks: (generation kwargs, glm-ft refuses it)
GENERATION_CASES = [
    ({"num_beams": 0}, True), ({"num_beams": -1}, True), ({"num_beams": 1}, False), ({"num_beams": 2}, False),
    ({"do_sample": True, "temperature": -1.0}, True), ({"do_sample": True, "temperature": 0.0}, True),
    ({"do_sample": True, "temperature": 0.01}, False), ({"do_sample": False, "temperature": -1.0}, False),
    ({"do_sample": True, "top_p": -0.1}, True), ({"do_sample": True, "top_p": 0.0}, False),
    ({"do_sample": True, "top_p": 1.0}, False), ({"do_sample": True, "top_p": 1.5}, True),
    ({"repetition_penalty": 0.0}, True), ({"repetition_penalty": -1.0}, True),
    ({"repetition_penalty": 0.5}, False), ({"max_new_tokens": 0}, True), ({"max_new_tokens": 1}, False),
]
# Refused by glm-ft though transformers runs it: top_p above 1 is no probability mass (transformers skips its
# top-p filter for any value >= 1, so 1.5 would silently mean "no top-p").
SILENTLY_IGNORED_BY_TRANSFORMERS = [{"do_sample": True, "top_p": 1.5}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch  # noqa: F401

    from glm_ft.chatglm3.tiny import ensure_tiny_model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "m")))


def _transformers_refuses(model, kwargs) -> bool:
    import torch
    from transformers import GenerationConfig

    ids = torch.tensor([[5, 6, 7, 8]])
    try:
        config = GenerationConfig(**{"max_new_tokens": 2, **kwargs}, pad_token_id=0, eos_token_id=2)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    except (ValueError, ZeroDivisionError, RuntimeError):  # num_beams 0: division by zero; -1: a negative size
        return True
    return False


def _glm_ft_refuses(kwargs) -> bool:
    overrides = [f"{GEN}.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in kwargs.items()]
    try:
        validate(compose(["experiment=quickstart", *overrides]), check_paths=False)
    except ConfigError as err:
        assert f"{GEN}." in str(err)
        return True
    return False


@pytest.mark.parametrize("kwargs, refused", GENERATION_CASES, ids=[str(k) for k, _ in GENERATION_CASES])
def test_generation_bounds_match_transformers_generate(kwargs, refused, tiny_model):
    assert _glm_ft_refuses(kwargs) == refused
    by_transformers = _transformers_refuses(tiny_model, kwargs)
    if kwargs in SILENTLY_IGNORED_BY_TRANSFORMERS:
        assert refused and not by_transformers
    else:
        assert by_transformers == refused


def test_numeric_trainer_bounds_where_transformers_has_its_own():
    """transformers' TrainingArguments refuses warmup_steps < 0 too; save_total_limit <= 0 and max_grad_norm < 0
    it accepts and ignores (keep all checkpoints, no clipping), which is why glm-ft refuses them."""
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="warmup_steps"):
        TrainingArguments(output_dir="/tmp/unused", warmup_steps=-1, use_cpu=True, report_to="none")
    TrainingArguments(output_dir="/tmp/unused", save_total_limit=-1, max_grad_norm=-1.0, use_cpu=True,
                      report_to="none")
    for key, value in (("warmup_steps", -1), ("save_total_limit", -1), ("max_grad_norm", -1)):
        with pytest.raises(ConfigError, match=f"training_args.{key}"):
            validate(compose(["experiment=quickstart", f"training_args.{key}={value}"]), check_paths=False)


@pytest.mark.parametrize("override", ["seed=0", f"seed={2**32 - 1}", "training_args.warmup_steps=0",
                                      "training_args.warmup_steps=0.5", "training_args.save_total_limit=1",
                                      "training_args.save_total_limit=null", "training_args.max_grad_norm=0",
                                      "training_args.lr_scheduler_type=inverse_sqrt",
                                      "training_args.optim=adafactor", "training_args.log_level=passive"])
def test_values_at_the_bounds_are_accepted(override):
    validate(compose(["experiment=quickstart", override]), check_paths=False)


# The arguments without which a scheduler does not build (transformers raises): what a config must give it.
NEEDED_KWARGS = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "cosine_warmup_with_min_lr": {"min_lr": 1e-3},
                 "warmup_stable_decay": {"num_decay_steps": 2}}


def _scheduler(name: str, kwargs: dict):
    import torch
    from transformers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=4, scheduler_specific_kwargs=kwargs)


def _validate_scheduler(name: str, kwargs: dict) -> None:
    validate(compose(["experiment=quickstart", f"training_args.lr_scheduler_type={name}",
                      f"training_args.lr_scheduler_kwargs={kwargs!r}".replace("'", "")]), check_paths=False)


@pytest.mark.parametrize("name", hf_choices.enum_values("SchedulerType"))
def test_a_scheduler_is_accepted_only_if_it_sets_the_rate_from_the_step_alone(name):
    """The Trainer steps any schedule but a LambdaLR on metric_for_best_model, eval_loss, which glm-ft's evaluation
    does not compute. An accepted type (with the arguments it needs) builds into a LambdaLR; a refused one fails to
    build or is metric-stepped (refused before anything loads instead of at the first evaluation)."""
    import torch

    kwargs = NEEDED_KWARGS.get(name, {})
    try:
        _validate_scheduler(name, kwargs)
    except ConfigError as err:
        assert str(err).startswith(f"training_args.lr_scheduler_type: {name} ")
        try:
            assert not isinstance(_scheduler(name, kwargs), torch.optim.lr_scheduler.LambdaLR)
        except (TypeError, ValueError):
            pass
        return
    assert isinstance(_scheduler(name, kwargs), torch.optim.lr_scheduler.LambdaLR)


@pytest.mark.parametrize("name", [n for n in hf_choices.enum_values("SchedulerType") if n not in UNRUNNABLE_SCHEDULERS])
def test_lr_scheduler_kwargs_are_the_arguments_transformers_scheduler_takes(name):
    """Each argument read from transformers' source is one its scheduler builds with (a value of the kind glm-ft
    checks for); a name it does not take, which glm-ft refuses, fails to build or, for the constant schedules, is
    silently ignored by get_scheduler; each argument NEEDED_KWARGS gives is needed."""
    import torch

    spec = hf_choices.scheduler_args(name)
    for kwarg in spec.names:
        value = spec.choices[kwarg][-1] if kwarg in spec.choices else 1e-4  # below any learning rate here
        kwargs = {**NEEDED_KWARGS.get(name, {}), kwarg: value}
        if kwarg in ("min_lr", "min_lr_rate"):  # one or the other
            kwargs = {k: v for k, v in kwargs.items() if k not in ("min_lr", "min_lr_rate") or k == kwarg}
        _validate_scheduler(name, kwargs)
        assert isinstance(_scheduler(name, kwargs), torch.optim.lr_scheduler.LambdaLR)
    with pytest.raises(ConfigError, match=r"^training_args.lr_scheduler_kwargs.bogus: not an argument"):
        _validate_scheduler(name, {**NEEDED_KWARGS.get(name, {}), "bogus": 1})
    if name not in ("constant", "constant_with_warmup"):
        with pytest.raises(TypeError):
            _scheduler(name, {**NEEDED_KWARGS.get(name, {}), "bogus": 1})
    if name in NEEDED_KWARGS:
        with pytest.raises(ConfigError, match=r"^training_args.lr_scheduler_kwargs"):
            _validate_scheduler(name, {})
        with pytest.raises((TypeError, ValueError)):
            _scheduler(name, {})
    if name == "polynomial":  # its end rate below the start
        with pytest.raises(ConfigError, match="lr_end: must be below training_args.learning_rate"):
            _validate_scheduler(name, {"lr_end": 2e-3})  # the quickstart's rate
        with pytest.raises(ValueError):
            _scheduler(name, {"lr_end": 1.0})
    if {"min_lr", "min_lr_rate"} <= set(spec.names):  # not both either
        with pytest.raises(ConfigError, match="exactly one of min_lr"):
            _validate_scheduler(name, {"min_lr": 1e-3, "min_lr_rate": 0.1})
        with pytest.raises(ValueError):
            _scheduler(name, {"min_lr": 1e-3, "min_lr_rate": 0.1})


def _schedule_faults(name: str, kwargs: dict, steps: int = 8) -> list[str]:
    """What is wrong with transformers' own schedule for these arguments: its rates (base rate 1) over `steps`
    training steps after one warmup step, through the step after the last (the Trainer steps the scheduler then)."""
    import torch
    from transformers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=steps,
                                  scheduler_specific_kwargs=kwargs)
        rates = [scheduler.lr_lambdas[0](step) for step in range(steps + 1)]
    except (ArithmeticError, ValueError) as err:
        return [f"fails: {err!r}"]
    trained, after = rates[:steps], rates[1:steps]  # the rates the steps train at; those after the warmup
    faults = ["a negative rate"] if min(trained) < 0 else []
    faults += ["a rate above the learning rate"] if max(trained) > 1 else []
    faults += ["a step at rate 0 after the warmup"] if min(after) == 0 else []
    faults += ["rises after the warmup"] if any(b > a + 1e-12 for a, b in zip(after, after[1:])) else []
    faults += ["never decays"] if after[-1] == 1 else []
    return faults


# (scheduler, lr_scheduler_kwargs, the key refused); the quickstart's learning rate is 2e-3
BAD_SCHEDULER_KWARGS = [
    ("cosine_with_restarts", {"num_cycles": -1}, "num_cycles"), ("cosine", {"num_cycles": 0}, "num_cycles"),
    ("polynomial", {"power": -1}, "power"), ("polynomial", {"lr_end": -0.5}, "lr_end"),
    ("inverse_sqrt", {"timescale": 0}, "timescale"), ("cosine_with_min_lr", {"min_lr": -0.5}, "min_lr"),
    ("cosine_with_min_lr", {"min_lr": 1.5}, "min_lr"), ("cosine_with_min_lr", {"min_lr_rate": 1.5}, "min_lr_rate"),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1, "warmup_lr_rate": -0.5}, "warmup_lr_rate"),
    ("warmup_stable_decay", {"num_decay_steps": 2, "min_lr_ratio": 2}, "min_lr_ratio"),
    ("warmup_stable_decay", {"num_decay_steps": -1}, "num_decay_steps"),
    ("warmup_stable_decay", {"num_decay_steps": 2, "num_stable_steps": -3}, "num_stable_steps"),
]


@pytest.mark.parametrize("name,kwargs,key", BAD_SCHEDULER_KWARGS)
def test_lr_scheduler_kwargs_outside_their_range_are_refused_naming_the_key(name, kwargs, key):
    """transformers checks none of these ranges: each bad value trains a wrong schedule (negative, rising, above the
    rate, at 0 early, never decaying) or fails at the end of training, once the model has loaded and trained; the
    scheduler's in-range defaults schedule none of that."""
    assert _schedule_faults(name, kwargs), kwargs
    assert _schedule_faults(name, NEEDED_KWARGS.get(name, {})) == []
    with pytest.raises(ConfigError, match=rf"^training_args\.lr_scheduler_kwargs\.{key}: must be "):
        _validate_scheduler(name, kwargs)


def test_the_zero_keys_read_from_deepspeeds_source_are_its_models_own():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from glm_ft.config.hf_choices import zero_config_keys

    fields = DeepSpeedZeroConfig.model_fields
    assert set(zero_config_keys()) == set(fields) | {f.alias for f in fields.values() if f.alias}
