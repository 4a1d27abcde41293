"""The string choices transformers accepts for Trainer arguments, and the keys DeepSpeed accepts in its ZeRO
section, read from their own source.

Validation runs before anything heavy loads, and importing `transformers.trainer_utils` or `training_args` imports
torch (seconds), as does any DeepSpeed module. So they are read with `ast` from the installed packages' files instead
(a few tens of milliseconds): always the installed version's own lists, never a copy that could drift.
tests/config/test_hf_choices.py holds them equal to the imported enums and DeepSpeed's own model.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.machinery
from pathlib import Path

# enum name → the module of transformers that defines it
_ENUMS = {
    "IntervalStrategy": "trainer_utils.py",
    "SaveStrategy": "trainer_utils.py",
    "SchedulerType": "trainer_utils.py",
    "OptimizerNames": "training_args.py",
}


def _package_dir(package: str) -> Path:
    # PathFinder locates the package without importing it (importing it would cost seconds here).
    spec = importlib.machinery.PathFinder.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _module_tree(relative: str, package: str = "transformers") -> ast.Module:
    path = _package_dir(package) / relative
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def zero_config_keys() -> tuple[str, ...]:
    """The keys DeepSpeed's ZeRO section takes: DeepSpeedZeroConfig's fields and their aliases (its model forbids
    any other)."""
    for node in _module_tree("runtime/zero/config.py", "deepspeed").body:
        if isinstance(node, ast.ClassDef) and node.name == "DeepSpeedZeroConfig":
            keys = []
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    keys.append(stmt.target.id)
                    if isinstance(stmt.value, ast.Call):
                        keys += [k.value.value for k in stmt.value.keywords
                                 if k.arg == "alias" and isinstance(k.value, ast.Constant)]
            if keys:
                return tuple(keys)
    raise LookupError("deepspeed/runtime/zero/config.py defines no DeepSpeedZeroConfig")


def enum_values(name: str) -> tuple[str, ...]:
    """The string values of transformers' `name` enum (an ExplicitEnum of `NAME = "value"` members)."""
    return tuple(value for _, value in _enum_members(name))


def _enum_members(name: str) -> list[tuple[str, str]]:
    for node in _module_tree(_ENUMS[name]).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            members = [(stmt.targets[0].id, stmt.value.value) for stmt in node.body
                       if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
                       and isinstance(stmt.value.value, str) and isinstance(stmt.targets[0], ast.Name)]
            if members:
                return members
    raise LookupError(f"transformers/{_ENUMS[name]} defines no enum {name}")


# What get_scheduler passes to a scheduler itself, and last_epoch, which it never passes (a resume's state sets it).
_SCHEDULER_OWN_ARGS = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")


@dataclasses.dataclass(frozen=True)
class SchedulerArgs:
    """The keyword arguments lr_scheduler_kwargs may give one of transformers' schedulers."""
    names: tuple[str, ...] | None  # None: the function takes **kwargs (reduce_lr_on_plateau, greedy)
    required: tuple[str, ...]  # without a default
    text: tuple[str, ...]  # those taking a word (warmup_type...); the others take numbers
    choices: dict[str, tuple[str, ...]]  # the words the function checks (`if ARG not in [...]: raise`)
    optional_none: tuple[str, ...]  # defaulting to None: null leaves them unset


@functools.cache
def scheduler_args(name: str) -> SchedulerArgs:
    """The arguments of the function transformers' TYPE_TO_SCHEDULER_FUNCTION maps the SchedulerType value `name`
    to, as get_scheduler calls it: its signature less what get_scheduler passes itself. get_scheduler passes nothing
    more to constant and constant_with_warmup, whose signatures take nothing more either."""
    members = {attr: value for attr, value in _enum_members("SchedulerType")}
    tree = _module_tree("optimization.py")
    function = None
    for node in tree.body:
        targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if isinstance(node, ast.Assign) and targets == ["TYPE_TO_SCHEDULER_FUNCTION"]:
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Attribute) and members.get(key.attr) == name and isinstance(value, ast.Name):
                    function = value.id
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
    if not found:
        raise LookupError(f"transformers/optimization.py maps no scheduler function to {name}")
    args = found[0].args
    if args.kwarg is not None:
        return SchedulerArgs(None, (), (), {}, ())
    positional = [*args.posonlyargs, *args.args]
    defaults = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults):]], args.defaults))
    defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
    names = tuple(a.arg for a in [*positional, *args.kwonlyargs] if a.arg not in _SCHEDULER_OWN_ARGS)
    annotations = {a.arg: ast.unparse(a.annotation) if a.annotation else "" for a in [*positional, *args.kwonlyargs]}
    text = tuple(n for n in names if "str" in annotations[n]
                 or isinstance(getattr(defaults.get(n), "value", None), str))
    choices = {}
    for node in ast.walk(found[0]):
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id in names
                and isinstance(node.ops[0], ast.NotIn) and isinstance(node.comparators[0], (ast.List, ast.Tuple))):
            choices[node.left.id] = tuple(e.value for e in node.comparators[0].elts if isinstance(e, ast.Constant))
    return SchedulerArgs(names, tuple(n for n in names if n not in defaults), text, choices,
                         tuple(n for n in names if isinstance(defaults.get(n), ast.Constant)
                               and defaults[n].value is None))


def log_levels() -> tuple[str, ...]:
    """TrainingArguments' `log_level` choices: transformers.utils.logging's `log_levels` plus "passive"."""
    for node in _module_tree("utils/logging.py").body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "log_levels"
                                                 for t in node.targets) and isinstance(node.value, ast.Dict)):
            return (*(k.value for k in node.value.keys if isinstance(k, ast.Constant)), "passive")
    raise LookupError("transformers/utils/logging.py defines no log_levels")
