"""What the command line alone can be judged on, before Hydra composes the config or creates a run folder.

- a misspelt key (`method.rank=8`, `training_args.max_step=10`): glm-ft's one line with the closest valid keys,
  instead of Hydra's hint to append the key with `+`; also in an experiment or search file of the user's own
  (`--config-dir`), as FILE:LINE;
- a switch given anything but true or false (`method.use_dora=2`, `training_args.bf16=yes`): the typed config
  would take any number or word as true;
- `GROUP=NAME` with no conf/GROUP/NAME.yaml (method, data, model, deepspeed, experiment, hparams_search), and
  `GROUP=null`, which Hydra refuses with a traceback (a group is dropped with `~GROUP`);
- `deepspeed.KEY=...` when the command line composes no DeepSpeed config (Hydra fails on it with a traceback), or
  a KEY the chosen conf/deepspeed file lacks (misspelt, or a DeepSpeed key it does not set, added with `+`);
- `resume=auto` with a `hydra.run.dir` that does not exist: there is nothing to resume, and Hydra would create the
  folder and start afresh;
- a `hydra.run.dir` / `hydra.sweep.dir` that can't be created (`/proc/x`): Hydra would fail with a traceback.

Only what is certain is judged here; everything else is left to Hydra and glm_ft.config.validate.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import OverrideParseException

from glm_ft.errors import ConfigError
from glm_ft.config.keys import check_key, closest, key_allows_null, key_type
from glm_ft.config.locations import config_dir
from glm_ft.config.schema import METHOD_SCHEMAS

CONF = config_dir()


def check_command_line(argv: list[str]) -> None:
    """Raise ConfigError for what is certainly wrong in these command-line arguments (sys.argv[1:])."""
    # Hydra's flags (--cfg job, -m, --config-dir=...) start with '-'; their values never hold '='.
    try:
        overrides = OverridesParser.create().parse_overrides(
            [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))])
    except OverrideParseException:
        return  # Hydra reports its own syntax errors
    _check_group_options(overrides, argv)
    dirs = _config_dirs(argv)
    methods = _chosen_methods(overrides, dirs)
    _check_deepspeed_keys(overrides, methods, dirs)
    _check_own_config_files(overrides, methods, dirs)
    for override in overrides:
        if override.type == OverrideType.CHANGE and override.package is None:
            problem = check_key(override.key_or_group, methods)
            if problem:
                raise ConfigError(problem)
            _check_switch(override, methods)
            _check_type(override, methods)
        elif override.type == OverrideType.DEL and override.package is None and "." in override.key_or_group \
                and key_type(override.key_or_group, methods) is not None:
            raise ConfigError(f"~{override.key_or_group}: a schema key can't be removed; set it instead "
                              f"({override.key_or_group}=...)")
    values = {o.key_or_group: o for o in overrides if o.type == OverrideType.CHANGE and not o.is_sweep_override()}
    if "optimized_metric" in values:  # a sweep's jobs would each find it, once the sweep had started
        from glm_ft.config.validate import check_optimized_metric

        check_optimized_metric(_value(values["optimized_metric"]),
                               {k: _value(values[f"data.{k}"]) for k in ("val_file", "test_file")
                                if f"data.{k}" in values})
    # hparams_search configs set hydra.mode=MULTIRUN themselves.
    multirun = any(a in ("-m", "--multirun") for a in argv) or _value(values.get("hparams_search")) is not None
    run_dir = _literal_path(values.get("hydra.run.dir"))
    if _value(values.get("resume")) == "auto" and run_dir is not None and not multirun and not run_dir.is_dir():
        raise ConfigError(f"resume=auto: the run folder '{run_dir}' (hydra.run.dir) does not exist, so there is "
                          "nothing to resume; pass hydra.run.dir=<the folder of the run to continue>")
    if "--cfg" in argv or "-c" in argv or "--help" in argv or "--hydra-help" in argv:
        return  # Hydra creates no folder for these
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        if key in values and not str(_value(values[key]) or "").strip():
            # Hydra would take the folder it was started from: run files and checkpoints among the user's own
            raise ConfigError(f"{key}: empty; name a folder for the run (e.g. {key}=outputs/my-run)")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    folder = _literal_path(values.get(key))
    if folder is not None:
        _check_creatable(key, folder)


def _check_group_options(overrides: list[Override], argv: list[str]) -> None:
    """`GROUP=NAME` with no conf/GROUP/NAME.yaml: one line (Hydra lists every option over a dozen lines); and
    `GROUP=null`, which Hydra answers with a traceback."""
    groups = {p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"}
    own_configs = any(a.startswith(("--config-dir", "-cd", "--config-path", "-cp")) for a in argv)
    for override in overrides:
        group = override.key_or_group
        if group not in groups or override.type != OverrideType.CHANGE or override.package is not None:
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        if any(value is None for value in values):
            optional = _override_in(CONF / "config.yaml", group, _UNSURE, prefix="") is None
            raise ConfigError(f"{group}=null: choose one of {', '.join(options)}"
                              + (f", or drop the group with ~{group}" if optional else ""))
        if own_configs:
            continue  # the user's own config folder may add options
        for value in values:
            if isinstance(value, str) and "${" not in value and value not in options:
                raise ConfigError(f"{group}={value}: no such {group}; choose one of {', '.join(options)}")


def _check_deepspeed_keys(overrides: list[Override], methods: tuple[str, ...] | None, dirs: list[Path]) -> None:
    """`deepspeed.KEY=...` with no DeepSpeed config composed (Hydra fails on it with an AssertionError), or with a
    KEY the chosen file lacks (Hydra's hint to append it with `+` would also write a misspelt key into the JSON,
    which DeepSpeed refuses only once the model has loaded)."""
    keys = [o.key_or_group for o in overrides if o.key_or_group.startswith("deepspeed.") and o.package is None]
    if not keys:
        return
    chosen = _chosen_deepspeed(overrides, methods, dirs)
    if chosen is None:
        raise ConfigError(f"{keys[0]}: no DeepSpeed config is chosen; add deepspeed=zero2 or deepspeed=zero3")
    path = _group_file("deepspeed", chosen, dirs) if chosen != _UNSURE else None
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, yaml.YAMLError):
        tree = None
    if any(entry != "_self_" for entry in _defaults(path) or []) if path is not None else False:
        tree = None  # it takes keys from other files too: only Hydra knows them all
    if _adds_deepspeed_keys(overrides, dirs):
        tree = None
    changed = {o.key_or_group for o in overrides if o.type == OverrideType.CHANGE}
    for key in [k for k in keys if k in changed] if isinstance(tree, dict) else []:
        node, parts = tree, key.split(".")[1:]
        for depth, part in enumerate(parts):
            if not isinstance(node, dict):
                break  # below a value: Hydra judges it
            if part not in node:
                where = ".".join(["deepspeed", *parts[:depth]])
                guesses = [f"{where}.{g}" for g in closest(part, [str(k) for k in node])]
                hint = f"did you mean {' or '.join(guesses)}?" if guesses else \
                    f"a DeepSpeed key it does not set is added with +{key}=..."
                shown = f"conf/deepspeed/{chosen}.yaml" if path.is_relative_to(CONF) else str(path)
                raise ConfigError(f"{key}: {shown} has no key '{part}' under {where} ({hint})")
            node = node[part]


def _check_switch(override: Override, methods: tuple[str, ...] | None) -> None:
    """OmegaConf turns 2 or 'yes' into True for a bool field; the user most likely meant something else."""
    if key_type(override.key_or_group, methods) is not bool:
        return
    values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    for value in values:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            continue  # what a sweep's value strings look like
        if not isinstance(value, bool) and not (isinstance(value, str) and "${" in value):
            raise ConfigError(f"{override.key_or_group}: must be true or false, got {value!r}")


def _check_type(override: Override, methods: tuple[str, ...] | None) -> None:
    """A value of the wrong type for its schema field (`method.r=abc`, `seed=1e3`, `training_args=foo`,
    `model.path=null`): one line, not Hydra's merge error over half a dozen lines."""
    key = override.key_or_group
    expected = key_type(key, methods)
    if expected is None or override.is_sweep_override() or (CONF / key).is_dir():
        return  # unknown, swept, or a group choice (data=sample names a file, not the section's value)
    value = override.value()
    if isinstance(value, str) and "${" in value:
        return  # an interpolation: resolved (and checked) later
    if value is None:
        if not key_allows_null(key, methods):
            raise ConfigError(f"{key}: may not be null")
        return
    if isinstance(expected, type) and dataclasses.is_dataclass(expected):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: is a section, not a value; set its keys ({key}.NAME=...)")
        return
    wrong = {int: lambda v: isinstance(v, bool) or not isinstance(v, int),
             float: lambda v: isinstance(v, bool) or not isinstance(v, (int, float))}.get(expected)
    if wrong is not None and wrong(value):
        kind = "an integer" if expected is int else "a number"
        given = (override.input_line or "").partition("=")[2] or override.get_value_element_as_str()
        raise ConfigError(f"{key}: expected {kind}, got {given!r}")


def _value(override: Override | None):
    return None if override is None else override.value()


def _literal_path(override: Override | None) -> Path | None:
    """The folder an override names, when it is a plain path (not an interpolation Hydra resolves later)."""
    value = _value(override)
    if not isinstance(value, str) or "${" in value:
        return None
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else Path.cwd() / path


def _check_creatable(key: str, folder: Path) -> None:
    """Whether the missing part of `folder` can be created: only trying tells (root may write anywhere but in
    /proc), so a folder of a unique name is made in its nearest existing parent and removed again. Not the folder
    itself: the ranks of one torchrun job check the same path at once. Hydra creates it for real a moment later."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == folder:
        return
    if not existing.is_dir():
        raise ConfigError(f"{key}: cannot create '{folder}': '{existing}' is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".glm-ft-check-", dir=existing))
    except OSError as err:
        raise ConfigError(f"{key}: cannot create '{folder}' ({err.strerror or err})") from None


def _config_dirs(argv: list[str]) -> list[Path]:
    """Where Hydra finds a group's file: the shipped conf/ first, then the user's folders (--config-dir / -cd)."""
    dirs = []
    for i, arg in enumerate(argv):
        for flag in ("--config-dir", "-cd"):
            if arg == flag and i + 1 < len(argv):
                dirs.append(Path(argv[i + 1]).expanduser())
            elif arg.startswith(f"{flag}="):
                dirs.append(Path(arg.partition("=")[2]).expanduser())
    return [CONF, *dirs]


def _group_file(group: str, name: str, dirs: list[Path]) -> Path | None:
    return next((d / group / f"{name}.yaml" for d in dirs if (d / group / f"{name}.yaml").is_file()), None)


def _chosen_methods(overrides: list[Override], dirs: list[Path]) -> tuple[str, ...] | None:
    """The method option(s) this command line composes: method=..., else the experiment's or search's choice,
    else conf/config.yaml's default. None when unsure (then only keys no method has are refused): a file of the
    user's own that chooses none may inherit a choice from its defaults."""
    groups = {o.key_or_group: o for o in overrides if o.type == OverrideType.CHANGE and o.package is None}
    chosen: list[str] = []
    if "method" in groups:
        method = groups["method"]
        chosen = list(method.sweep_string_iterator()) if method.is_sweep_override() else [str(method.value())]
    else:
        for group in ("experiment", "hparams_search"):  # conf/config.yaml order: the later one wins
            option = groups.get(group)
            if option is not None and option.is_sweep_override():
                return None  # each job may choose another
            if option is not None:
                path = _group_file(group, str(option.value()), dirs)
                found = _method_override_in(path) if path is not None else []
                if not found and (path is None or not path.is_relative_to(CONF)):
                    return None
                chosen = found or chosen
        chosen = chosen or _method_override_in(CONF / "config.yaml", default_list=True)
    if not chosen or any(m not in METHOD_SCHEMAS for m in chosen):
        return None
    return tuple(dict.fromkeys(chosen))


_UNSURE = "unsure"


def _adds_deepspeed_keys(overrides: list[Override], dirs: list[Path]) -> bool:
    """Whether an experiment or search file this command line chooses sets keys of the DeepSpeed config (or may:
    a swept choice, or a file that can't be read)."""
    for override in overrides:
        if override.key_or_group not in ("experiment", "hparams_search") or override.package is not None or \
                override.type != OverrideType.CHANGE:
            continue
        if override.is_sweep_override():
            return True
        path = _group_file(override.key_or_group, str(override.value()), dirs)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) if path is not None else None
        except (OSError, yaml.YAMLError):
            return True
        if isinstance(data, dict) and isinstance(data.get("deepspeed"), dict):
            return True
    return False


def _chosen_deepspeed(overrides: list[Override], methods: tuple[str, ...] | None, dirs: list[Path]) -> str | None:
    """The DeepSpeed option this command line composes, None for none, _UNSURE when it can't be told. In the
    defaults' order, the later wins: conf/config.yaml (none), the method's, the experiment's, the search's, then
    the command line."""
    groups = {o.key_or_group: o for o in overrides if o.package is None}
    given = groups.get("deepspeed")
    if given is not None:
        if given.type == OverrideType.DEL:
            return None
        return _UNSURE if given.is_sweep_override() else str(given.value())
    if methods is None or len(methods) != 1:
        return _UNSURE
    chosen = _override_in(CONF / "method" / f"{methods[0]}.yaml", "deepspeed")
    for group in ("experiment", "hparams_search"):
        option = groups.get(group)
        if option is not None:
            if option.is_sweep_override():
                return _UNSURE
            path = _group_file(group, str(option.value()), dirs)
            if path is None:
                return _UNSURE
            chosen = _override_in(path, "deepspeed", chosen)
    return chosen


def _check_own_config_files(overrides: list[Override], methods: tuple[str, ...] | None, dirs: list[Path]) -> None:
    """The keys an experiment or search file of the user's own (`--config-dir`) sets, as the command line's are:
    Hydra refuses a misspelt one over half a dozen lines, naming neither the file's line nor the close names.
    The shipped files are held against the schema by the tests."""
    for override in overrides:
        group = override.key_or_group
        if group not in ("experiment", "hparams_search") or override.type != OverrideType.CHANGE or \
                override.package is not None:
            continue
        swept = override.is_sweep_override()
        for name in override.sweep_string_iterator() if swept else [override.value()]:
            path = _group_file(group, str(name), dirs)
            if path is None or path.is_relative_to(CONF):
                continue
            # swept, each file's own choice of method counts (none chosen there: unsure)
            own = tuple(m for m in _method_override_in(path) if m in METHOD_SCHEMAS)
            for key, line in _global_keys(path):
                problem = check_key(key, methods or own or None)
                if problem:
                    raise ConfigError(f"{path}:{line}: {problem}")


def _global_keys(path: Path) -> list[tuple[str, int]]:
    """(dotted key, line) of every value a `# @package _global_` file sets, its defaults list aside; [] for a file
    of another package, or one YAML can't read (Hydra says what is wrong with it)."""
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    package = None
    for line in text.splitlines():  # Hydra's header: the `# @KEY VALUE` lines the file starts with
        if line.strip() and not re.match(r"\s*#\s*@", line):
            break
        words = line.lstrip().lstrip("#").split()
        if len(words) == 2 and words[0] == "@package":
            package = words[1]
    if package != "_global_" or not isinstance(root, yaml.MappingNode):
        return []
    found: list[tuple[str, int]] = []

    def walk(node: yaml.MappingNode, prefix: str) -> None:
        for key_node, value in node.value:
            key = f"{prefix}{key_node.value}"
            if key in ("defaults", "hydra"):
                continue
            if isinstance(value, yaml.MappingNode) and value.value:
                walk(value, f"{key}.")
            else:
                found.append((key, key_node.start_mark.line + 1))

    walk(root, "")
    return found


def _defaults(path: Path) -> list | None:
    """A config file's defaults list; None when it can't be read."""
    try:
        return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("defaults") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def _override_in(path: Path, group: str, otherwise: str | None = None, prefix: str = "override /") -> str | None:
    """The `override /GROUP: X` (with prefix "": `GROUP: X`) of a config file's defaults (X None for null), else
    `otherwise`."""
    defaults = _defaults(path)
    if defaults is None:
        return _UNSURE
    for entry in defaults:
        if isinstance(entry, dict) and f"{prefix}{group}" in entry:
            value = entry[f"{prefix}{group}"]
            return None if value is None else str(value)
    return otherwise


def _method_override_in(path: Path, default_list: bool = False) -> list[str]:
    defaults = _defaults(path) or []
    key = "method" if default_list else "override /method"
    return [str(entry[key]) for entry in defaults if isinstance(entry, dict) and entry.get(key) is not None]
