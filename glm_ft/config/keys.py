"""Config keys known to the schema, and the closest valid ones for a misspelt key ("did you mean method.r?").

Used twice: on the command line before Hydra composes (Hydra's own answer to `method.rank=8` is a hint to append
the key with `+`), and by glm_ft.config.validate for keys that reached the config through `+key=...`. Light:
schema only.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any

from glm_ft.config.locations import config_dir
from glm_ft.config.schema import METHOD_SCHEMAS, Config


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


@functools.cache
def _fields(schema: type) -> dict[str, Any]:
    hints = typing.get_type_hints(schema)  # the schema module uses `from __future__ import annotations`
    return {f.name: _unwrap_optional(hints[f.name]) for f in dataclasses.fields(schema)}


def _children(node: Any, methods: tuple[str, ...]) -> dict[str, Any] | None:
    """Keys under a schema node with their types; None where the config is free-form (deepspeed.*) or a leaf."""
    if node == "method":
        out: dict[str, Any] = {}
        for name in methods:
            out.update(_fields(METHOD_SCHEMAS[name]))
        return out
    if isinstance(node, type) and dataclasses.is_dataclass(node):
        return _fields(node)
    return None


# The reference demo's section names (its finetune.yaml) → glm-ft's groups.
DOCUMENTED_SECTIONS = {"peft_config": "method", "data_config": "data"}


def _top_level() -> dict[str, Any]:
    fields = dict(_fields(Config))
    fields["method"] = "method"  # typed Any in the schema: one dataclass per method
    # Groups that only select config files (experiment=..., hparams_search=...) are keys too.
    for group in sorted(config_dir().iterdir()):
        if group.is_dir() and group.name not in fields and group.name != "hydra":
            fields[group.name] = None
    return fields


def check_key(key: str, methods: tuple[str, ...] | None = None) -> str | None:
    """None when `key` (dotted) may be set, else the message for it. `methods`: the method(s) chosen, None when
    not known (then only a method key that no method has is refused)."""
    if key == "hydra" or key.startswith("hydra.") or "/" in key:
        return None  # Hydra's own config, or a nested group choice (hydra/launcher=joblib_gpus): Hydra checks it
    node: Any = None
    children: dict[str, Any] | None = _top_level()
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if children is None:
            return None  # below a free-form or leaf value: Hydra and the validator judge it
        prefix = ".".join(parts[:depth])
        if prefix == "method" and any(part in _fields(METHOD_SCHEMAS[m]) for m in METHOD_SCHEMAS):
            if methods and not all(part in _fields(METHOD_SCHEMAS[m]) for m in methods):
                return _method_key_message(key, part, methods)
        elif part not in children:
            if depth == 0 and part in DOCUMENTED_SECTIONS and len(parts) > 1:
                mapped = f"{DOCUMENTED_SECTIONS[part]}.{'.'.join(parts[1:])}"
                said = f"unknown key '{key}': the documented {part} is glm-ft's {DOCUMENTED_SECTIONS[part]}"
                problem = check_key(mapped, methods)
                return f"{said}, and {problem}" if problem else f"{said} (did you mean {mapped}?)"
            return unknown_key_message(".".join(parts[:depth + 1]), list(children))
        node = children[part]
        children = _children(node, methods or tuple(METHOD_SCHEMAS))
    return None


def key_type(key: str, methods: tuple[str, ...] | None = None) -> Any:
    """The schema type of a known dotted key (bool, int, a dataclass, ...); None when unknown or free-form."""
    node: Any = None
    children: dict[str, Any] | None = _top_level()
    for part in key.split("."):
        if children is None or part not in children:
            return None
        node = children[part]
        children = _children(node, methods or tuple(METHOD_SCHEMAS))
    return node


def key_allows_null(key: str, methods: tuple[str, ...] | None = None) -> bool:
    """Whether the schema field at a known dotted key is Optional (True when unknown: Hydra and the validator
    judge it)."""
    parent, _, last = key.rpartition(".")
    if parent == "method":
        schemas = [METHOD_SCHEMAS[m] for m in (methods or tuple(METHOD_SCHEMAS))]
    else:
        node = key_type(parent, methods) if parent else Config
        schemas = [node] if isinstance(node, type) and dataclasses.is_dataclass(node) else []
    hints = [typing.get_type_hints(schema) for schema in schemas]
    found = [h[last] for h in hints if last in h]
    if not found:
        return True
    return any(typing.get_origin(t) is typing.Union and type(None) in typing.get_args(t) or t is Any for t in found)


def _method_key_message(key: str, part: str, methods: tuple[str, ...]) -> str:
    owners = [m for m in METHOD_SCHEMAS if part in _fields(METHOD_SCHEMAS[m])]
    if len(methods) == 1 and list(_fields(METHOD_SCHEMAS[methods[0]])) == ["name"]:
        return no_keys_message(key, methods[0], owners)
    chosen = ",".join(m for m in methods if m not in owners)
    return f"{key}: method={chosen} has no key '{part}' (it belongs to method={'|'.join(owners)})"


def no_keys_message(key: str, method: str, owners: list[str] | None = None) -> str:
    """A key set on a method that has none of its own (sft): name the methods that do take it."""
    from glm_ft.methods import METHODS

    owners = owners or [m for m, module in METHODS.items() if module.PEFT_CONFIG_KEYS is not None]
    return (f"{key}: method={method} ({METHODS[method].SUMMARY}) takes no PEFT keys; drop '{key}' or choose "
            f"method={'|'.join(owners)}")


def closest(word: str, candidates: list[str], n: int = 3) -> list[str]:
    """Close spellings first, then keys that are a prefix of the word or start with it (rank → r)."""
    ratio = {c: difflib.SequenceMatcher(None, word, c).ratio() for c in candidates}
    close = sorted((c for c in candidates if ratio[c] >= 0.6), key=lambda c: -ratio[c])
    close = [c for c in close if ratio[c] >= ratio[close[0]] - 0.1]  # only the near-best: max_step → max_steps
    affix = [c for c in candidates if word.startswith(c) or c.startswith(word)]
    both = [c for c in close if c in affix]
    return list(dict.fromkeys(both + close + affix))[:n]


def did_you_mean(word: str, candidates: list[str], otherwise: str = "") -> str:
    """"did you mean A or B?" for the candidates closest to `word`, else `otherwise`."""
    guesses = closest(word, candidates)
    return f"did you mean {' or '.join(guesses)}?" if guesses else otherwise


def _leaf_paths(children: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name, node in children.items():
        sub = _children(node, tuple(METHOD_SCHEMAS))
        out += _leaf_paths(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return out


def unknown_key_message(key: str, allowed: list[str]) -> str:
    prefix, _, last = key.rpartition(".")
    guesses = [f"{prefix}.{g}" if prefix else g for g in closest(last, allowed)]
    if not guesses:
        # The right name under another section? (max_steps=10 → training_args.max_steps)
        leaves = _leaf_paths(_top_level())
        by_last = {}
        for path in leaves:
            by_last.setdefault(path.rpartition(".")[2], []).append(path)
        guesses = [p for name in closest(last, list(by_last)) for p in by_last[name]][:3]
    if guesses:
        return f"unknown key '{key}' (did you mean {' or '.join(guesses)}?)"
    where = f"under {prefix}" if prefix else "at the top level"
    return f"unknown key '{key}' (valid keys {where}: {', '.join(allowed)})"
