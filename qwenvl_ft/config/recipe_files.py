"""Reading recipe files defensively, and checking group choices before Hydra sees them.

Every `*.yaml` of the recipe folders is registered at start-up (config/compose.py `register_all`), but a file that
cannot be used (a YAML syntax error, unreadable, a folder named `*.yaml`, empty, not a mapping) is only remembered
with its reason: it stops the command that chooses it (`recipe=NAME`, with file:line:column and the parser's
reason), and no other. A choice of a recipe or group option that does not exist gets a one-line did-you-mean, as a
misspelt key does, instead of Hydra's option list, search path and HYDRA_FULL_ERROR hint.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

from qwenvl_ft.errors import ConfigError

# recipe name -> why its file cannot be used (filled by register_all)
BROKEN: Dict[str, str] = {}
# every recipe of the recipe folders, read or not (register_all reads only those a command chooses)
NAMES: Set[str] = set()


def read_recipe(path: Path, name: Optional[str] = None):
    """The recipe file as an OmegaConf mapping; ConfigError naming the file (and line:column) when it is not one."""
    import yaml
    from omegaconf import DictConfig, OmegaConf

    name = name or path.stem
    if path.is_dir():
        raise ConfigError(f"recipe {name}: {path} is a folder, not a YAML file")
    try:
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        reason = ": ".join(part for part in (err.context, err.problem) if part)
        raise ConfigError(f"recipe {name}: {where}: {reason or 'not valid YAML'}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe {name}: cannot read {path} ({type(err).__name__}: {err})") from None
    except Exception as err:  # OmegaConf's own refusals (e.g. an unsupported value type)
        raise ConfigError(f"recipe {name}: {path}: {type(err).__name__}: {err}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"recipe {name}: {path} holds a {type(node).__name__.replace('Config', '').lower()}, "
                          f"not a mapping of config keys (defaults: [...], optimizer: {{lr: ...}}, ...)")
    if len(node) == 0:
        raise ConfigError(f"recipe {name} is empty ({path}): a recipe sets at least one key or default")
    return node


def choice_values(override) -> List[str]:
    """The option names an override of a group chooses: one, or each of a `-m` sweep's a,b,c (a range or glob
    is Hydra's to expand and check)."""
    from hydra.core.override_parser.types import ChoiceSweep

    value = override.value()
    if isinstance(value, str):
        return [value]
    if isinstance(value, ChoiceSweep):
        return [v for v in value.list if isinstance(v, str)]
    return []


def check_group_choice(group: str, name: str, config_dir: Path) -> None:
    """ConfigError when `group=name` names no option of the group (recipes: also a recipe whose file is broken)."""
    from hydra.core.config_store import ConfigStore

    if group == "recipe" and name in BROKEN:
        raise ConfigError(BROKEN[name])
    stored = ConfigStore.instance().repo.get(group, {})
    options = sorted({Path(key).stem for key in stored if key.endswith(".yaml")} |
                     {path.stem for path in (config_dir / group).glob("*.yaml")} |
                     (set(BROKEN) | NAMES if group == "recipe" else set()))
    options = [o for o in options if o != "schema" and not o.endswith("_schema")]
    if name in options or name == "null":
        return
    hint = difflib.get_close_matches(name, options, n=1)
    suggestion = f" Did you mean '{group}={hint[0]}'?" if hint else ""
    listed = "qwenvl-ft recipes lists them" if group == "recipe" else f"options: {', '.join(options)}"
    raise ConfigError(f"unknown {group} '{name}'.{suggestion} ({listed})")


def check_start_from_fields(overrides: Sequence, recipe: Optional[str]) -> None:
    """`model.start_from.FIELD=...` changes the recipe's model.start_from; on a recipe without one there is
    nothing to change, and no mapping merges into its null (Hydra fails inside OmegaConf: 'Unexpected type for
    root')."""
    from hydra.core.config_store import ConfigStore

    fields = [o for o in overrides if not o.is_delete() and (o.key_or_group.startswith("model.start_from.") or (
        o.key_or_group == "model.start_from" and isinstance(o.value(), dict)))]
    if not fields:
        return
    node = None
    if recipe and recipe not in BROKEN:
        try:
            node = ConfigStore.instance().load(f"recipe/{recipe}.yaml").node
        except Exception:
            node = None
    has = node is not None and node.get("model") is not None and node.model.get("start_from") is not None
    if not has:
        first = fields[0]
        raise ConfigError(f"{first.key_or_group}={first.value()}: recipe {recipe or '(none)'} has no "
                          f"model.start_from to change. A run that starts from another run's final/ declares it "
                          f"whole in a recipe file of its own (qwenvl-ft train my_run.yaml): "
                          f"model: {{start_from: {{recipe: NAME, output_dir: DIR, overrides: [...]}}}}")
