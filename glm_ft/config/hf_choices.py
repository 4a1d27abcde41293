"""The string choices transformers accepts for Trainer arguments, and the keys DeepSpeed accepts in its ZeRO
section, read from their own source.

Validation runs before anything heavy loads, and importing `transformers.trainer_utils` or `training_args` imports
torch (seconds), as does any DeepSpeed module. So they are read with `ast` from the installed packages' files instead
(a few tens of milliseconds): always the installed version's own lists, never a copy that could drift.
tests/config/test_hf_choices.py holds them equal to the imported enums and DeepSpeed's own model.
"""

from __future__ import annotations

import ast
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
    for node in _module_tree(_ENUMS[name]).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            values = [stmt.value.value for stmt in node.body
                      if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
                      and isinstance(stmt.value.value, str)]
            if values:
                return tuple(values)
    raise LookupError(f"transformers/{_ENUMS[name]} defines no enum {name}")


def log_levels() -> tuple[str, ...]:
    """TrainingArguments' `log_level` choices: transformers.utils.logging's `log_levels` plus "passive"."""
    for node in _module_tree("utils/logging.py").body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "log_levels"
                                                 for t in node.targets) and isinstance(node.value, ast.Dict)):
            return (*(k.value for k in node.value.keys if isinstance(k, ast.Constant)), "passive")
    raise LookupError("transformers/utils/logging.py defines no log_levels")
