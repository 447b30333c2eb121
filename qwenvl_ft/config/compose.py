"""Where the configs live, how recipes join them, and composing outside of `@hydra.main`.

Group options live in `conf/`, named runs in `recipes/`. In a source checkout both sit at the repository top
level; a wheel carries them inside the package (`qwenvl_ft/conf`, `qwenvl_ft/recipes`, see pyproject.toml).
Recipes are options of the Hydra group `recipe`. Hydra wants a group to be a sub-folder of a config root, which
would force `recipes/` to live inside `conf/`; instead every `*.yaml` in the recipe folders is registered in the
ConfigStore under `recipe/<name>` with package `_global_`, exactly as a `# @package _global_` file inside
`conf/recipe/` would be. User folders join through `QWENVL_FT_RECIPES` (os.pathsep-separated), or
`--recipe-dir DIR` on the command line; a single file joins as `qwenvl-ft train path/to/run.yaml` (named by its
stem, as if its folder were a recipe folder).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Collection, Iterable, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from qwenvl_ft.config.recipe_files import BROKEN, NAMES, check_group_choice, check_start_from_fields, choice_values, \
    read_recipe
from qwenvl_ft.config.schema import GROUP_SCHEMAS, TrainConfig, register_schemas, root_schema
from qwenvl_ft.errors import ConfigError

RECIPES_ENV = "QWENVL_FT_RECIPES"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _shipped_dir(name: str) -> Path:
    inside_package = _PACKAGE_DIR / name  # installed wheel
    if inside_package.is_dir():
        return inside_package
    return _PACKAGE_DIR.parent / name  # source checkout / editable install


def config_dir() -> Path:
    return _shipped_dir("conf")


def recipe_dirs(extra: Iterable[str] = ()) -> List[Path]:
    dirs = [_shipped_dir("recipes")]
    dirs += [Path(d) for d in os.environ.get(RECIPES_ENV, "").split(os.pathsep) if d]
    dirs += [Path(d) for d in extra]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"recipe folder {d} does not exist")
    return dirs


def available_recipes(extra: Iterable[str] = (), files: Iterable[str] = ()) -> dict:
    """Recipe name -> file; a later folder overrides an earlier one of the same name, a file given on its own
    overrides them all."""
    found = {}
    for d in recipe_dirs(extra):
        for path in sorted(d.glob("*.yaml")):
            found[path.stem] = path
    for file in files:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        found[path.stem] = path
    return found


def recipe_folder(recipe: Optional[str]) -> str:
    """The output folder of a recipe: its name, or `custom` for a run composed without one."""
    return recipe or "custom"


def register_all(extra_recipe_dirs: Iterable[str] = (), recipe_files: Iterable[str] = (),
                 config_name: Optional[str] = None, recipes: Optional[Collection[str]] = None) -> None:
    """The recipes and the root schemas in Hydra's ConfigStore: only `config_name`'s schema and the `recipes`
    named when given (a command reads the recipes it chooses; parsing all 21 shipped files is ~0.16 s of every
    start), all otherwise. Every recipe's name is known either way (NAMES: the did-you-mean of a misspelt one)."""
    from hydra.core.config_store import ConfigStore

    register_schemas(config_name)
    # The primary configs' hydra.run.dir: `oc.select` cannot default a choice that exists but is null (recipe: null).
    OmegaConf.register_new_resolver("recipe_folder", recipe_folder, replace=True)
    store = ConfigStore.instance()
    BROKEN.clear()
    NAMES.clear()
    for name, path in available_recipes(extra_recipe_dirs, recipe_files).items():
        NAMES.add(name)
        if recipes is not None and name not in recipes:
            continue
        try:
            node = read_recipe(path, name)
        except ConfigError as err:  # stops only the command that chooses it (recipe_files.py)
            BROKEN[name] = str(err)
            continue
        store.store(group="recipe", name=name, node=node, package="_global_", provider=str(path))


# ----------------------------------------------------------------------------------------------------------------
# Override checks. Hydra reports an unknown key as "Key 'lrr' is not in struct" without saying what would have
# been valid; checking the keys against the schema first gives a message that lists the valid keys.

_GROUPS = set(GROUP_SCHEMAS) | {"recipe", "sweep"}


def _schema_fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


_ENGINE_KEYS = ("deepspeed", "fsdp", "fsdp_config", "ddp_backend")  # TrainingArguments names users try


def check_override_keys(overrides: Sequence[str], root=TrainConfig) -> None:
    """Raise ConfigError naming the first override whose key is not in the schema, or whose group choice (a
    recipe, a group option) does not exist (recipe_files.py)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # Hydra's parser error already says what is wrong with the syntax
        raise ConfigError(str(err)) from None
    for override in parsed:
        key = override.key_or_group
        # `+key=value` is checked too: Hydra would add an unknown key and the typed config would drop it silently
        # (`+trainer.deepspeed=ds.json` trained without DeepSpeed).
        if key.startswith("hydra") or override.is_delete() or "@" in key:
            continue
        if key in _GROUPS:  # a group choice: an option that exists (a did-you-mean, not Hydra's search path)
            for name in choice_values(override):
                check_group_choice(key, name, config_dir())
            continue
        problem = unknown_key(key, root)
        if problem:
            raise ConfigError(problem)
    check_start_from_fields(parsed, chosen_recipe(overrides))


def unknown_key(key: str, root=TrainConfig) -> Optional[str]:
    """What is wrong with the dotted `key` (a did-you-mean and the valid keys), or None when the schema has it."""
    import typing

    cls, walked = root, []
    for part in key.split("."):
        fields = _schema_fields(cls)
        if part not in fields:
            where = ".".join(walked) or "the top level"
            hint = difflib.get_close_matches(part, fields, n=1)
            suggestion = f" Did you mean '{'.'.join(walked + hint)}'?" if hint else ""
            if part in _ENGINE_KEYS:
                suggestion = " Several GPUs and engines are the dist group's: dist=ddp|fsdp|zero2|zero3|zero3_offload."
            return f"unknown config key '{key}'.{suggestion} Valid keys of {where}: {', '.join(fields)}"
        walked.append(part)
        nested = _unwrap_optional(typing.get_type_hints(cls)[part])
        if not dataclasses.is_dataclass(nested):
            return None  # a leaf (or a list/dict value): deeper keys are Hydra's to check
        cls = nested
    return None


def check_recipe_keys(path: Path, root=TrainConfig) -> None:
    """Every key a recipe file sets exists in the schema: the error names the file and suggests the key meant
    (Hydra would only say that the key is not in the struct)."""
    node = read_recipe(path)
    for key in _leaf_keys(node):
        problem = unknown_key(key, root)
        if problem:
            raise ConfigError(f"{path}: {problem}")


def _leaf_keys(node, prefix: str = "") -> List[str]:
    keys = []
    for name in node:
        if not prefix and name in ("defaults", "hydra"):
            continue
        value = node._get_node(name)
        dotted = f"{prefix}{name}"
        keys += _leaf_keys(value, dotted + ".") if isinstance(value, DictConfig) and len(value) else [dotted]
    return keys


def chosen_recipe(overrides: Sequence[str]) -> Optional[str]:
    """The value of a `recipe=NAME` override, if any."""
    for override in overrides:
        if override.startswith("recipe="):
            return override.split("=", 1)[1]
    return None


def _unwrap_optional(tp):
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0]
    return tp


def validate(cfg: DictConfig) -> TrainConfig:
    """Run the range checks of every group; returns the typed config object."""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(str(err)) from None


def compose(overrides: Sequence[str] = (), config_name: str = "train",
            extra_recipe_dirs: Iterable[str] = (), output_dir: Optional[str] = None) -> DictConfig:
    """Compose and validate a config without `@hydra.main` (tests, notebooks, other tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_all(extra_recipe_dirs, config_name=config_name)
    check_override_keys(overrides, root_schema(config_name))
    recipe = available_recipes(extra_recipe_dirs).get(chosen_recipe(overrides) or "")
    if recipe is not None:
        check_recipe_keys(recipe, root_schema(config_name))
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        except Exception as err:  # Hydra puts the useful half of the message in the cause
            cause = f"\n{err.__cause__}" if err.__cause__ is not None else ""
            raise ConfigError(f"{err}{cause}") from None
    if output_dir is not None:
        cfg.output_dir = output_dir
    validate(cfg)
    return cfg


def compose_run(overrides: Sequence[str], output_dir: str) -> DictConfig:
    """A `train` config composed and validated from command-line style overrides, also from inside a running
    `qwenvl-ft` command (whose Hydra is already initialised with the same config folder and recipes)."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return compose(overrides, output_dir=output_dir)
    from hydra import compose as hydra_compose

    check_override_keys(overrides, TrainConfig)
    try:
        cfg = hydra_compose(config_name="train", overrides=list(overrides))
    except Exception as err:
        cause = f"\n{err.__cause__}" if err.__cause__ is not None else ""
        raise ConfigError(f"{err}{cause}") from None
    cfg.output_dir = output_dir
    validate(cfg)
    return cfg
