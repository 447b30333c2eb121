"""`qwenvl-ft COMMAND [hydra arguments]`.

Each command is a plain function of a composed config, wrapped here by `@hydra.main`, so everything Hydra offers
(overrides, `--cfg job`, `-m` sweeps, `--help`) works the same for all of them. Heavy imports (torch,
transformers) happen inside the commands, so composing and printing a config stays fast.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from qwenvl_ft.config.compose import available_recipes, check_override_keys, check_recipe_keys, chosen_recipe, \
    config_dir, register_all
from qwenvl_ft.config.recipe_files import choice_values
from qwenvl_ft.config.schema import root_schema
from qwenvl_ft.errors import ConfigError

log = logging.getLogger("qwenvl_ft")

USAGE = """usage: qwenvl-ft COMMAND [RECIPE.yaml] [--recipe-dir DIR] [key=value ...] [hydra arguments]

commands:
  train        fine-tune with the training method trainer= names (see "methods" below)
  eval         generate on the held-out split with the base and the fine-tuned model; metrics side by side
  infer        one prompt over images with the base, base + adapter, or a merged model (JSONL out)
  merge        fold a LoRA/DoRA/QLoRA adapter into the base and save a plain transformers model
  chat         a web page to chat with the base, base + adapter (side by side) or a merged model (needs [ui])
  data-check   read and validate the whole dataset (processor only, no model, no GPU) and report on it
  estimate     predict a training run's peak GPU memory from the config (no weights loaded)
  recipes      list the available recipes
  doctor       the installed versions against the tested range, the GPU and the kernel paths (for bug reports)

`qwenvl-ft COMMAND --help` lists every config key of the command with what it does.

examples:
  qwenvl-ft train recipe=demo
  qwenvl-ft train my_run.yaml optimizer.lr=1e-4      # a YAML file of your own is a recipe (defaults + deltas)
  qwenvl-ft train recipe=qlora_7b_amazon optimizer.lr=1e-4
  qwenvl-ft train recipe=qlora_7b_amazon --cfg job
  qwenvl-ft train -m recipe=demo optimizer.lr=1e-3,3e-3
  qwenvl-ft data-check data=llava data.path=train.jsonl data.image_folder=images
  qwenvl-ft estimate recipe=qlora_7b_amazon data.packing=true
  qwenvl-ft train recipe=demo run_name=exp1       # run it again after an interruption: it resumes
  qwenvl-ft eval  recipe=demo run_name=exp1
  qwenvl-ft merge recipe=demo run_name=exp1
  qwenvl-ft infer recipe=demo run_name=exp1 "infer.images=[photo.jpg]" "infer.prompt=What is in the image?"
  qwenvl-ft chat  recipe=demo run_name=exp1       # prints the local URL of the page
  qwenvl-ft train recipe=demo run_name=exp1 hub.push=true hub.repo_id=me/demo-exp1
"""


def usage() -> str:
    """USAGE plus the registered training methods (qwenvl_ft/methods/), each with its demo recipe."""
    from qwenvl_ft import methods

    lines = [f"  trainer={m.name:<11s}{m.summary} (demo: recipe={m.demo_recipe})" for m in methods.registry().values()]
    return USAGE + "\nmethods:\n" + "\n".join(lines) + "\n"


# command -> (primary config name, "module:function" run on the composed config; imported only when run)
COMMANDS: Dict[str, Tuple[str, str]] = {
    "train": ("train", "qwenvl_ft.commands.train:train"),
    "data-check": ("train", "qwenvl_ft.commands.data_check:data_check"),
    "estimate": ("train", "qwenvl_ft.commands.estimate:estimate"),
    "eval": ("eval", "qwenvl_ft.commands.eval:evaluate"),
    "infer": ("infer", "qwenvl_ft.commands.infer:infer"),
    "merge": ("merge", "qwenvl_ft.commands.merge:merge"),
    "chat": ("chat", "qwenvl_ft.commands.chat:chat"),
}
# command -> "module:function" of a command that reads no config (no Hydra run): called with no argument, it returns
# the exit status
NO_CONFIG: Dict[str, str] = {
    "doctor": "qwenvl_ft.commands.doctor:doctor",
}


def _summary(command: str) -> str:
    """The command's line of USAGE."""
    for line in USAGE.splitlines():
        if line.startswith(f"  {command} "):
            return line.strip()
    return command


def _task(target: str) -> Callable:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def _split_recipe_dirs(args: List[str]) -> Tuple[List[str], List[str]]:
    dirs, rest, i = [], [], 0
    while i < len(args):
        if args[i] == "--recipe-dir" and i + 1 < len(args):
            dirs.append(args[i + 1])
            i += 2
        elif args[i].startswith("--recipe-dir="):
            dirs.append(args[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(args[i])
            i += 1
    return dirs, rest


def _split_recipe_file(args: List[str]) -> Tuple[List[str], List[str]]:
    """`qwenvl-ft train path/to/run.yaml ...`: a YAML file among the arguments is a recipe (a positional argument
    with no `=`; Hydra's own parser would refuse it). Returns (the file, if any; the other arguments)."""
    files = [a for a in args if a.endswith((".yaml", ".yml")) and "=" not in a and not a.startswith("-")]
    if len(files) > 1:
        raise ConfigError(f"give one recipe file, not {len(files)}: {', '.join(files)}")
    if files and chosen_recipe(args):
        raise ConfigError(f"give either the recipe file {files[0]} or recipe={chosen_recipe(args)}, not both")
    return files, [a for a in args if a not in files]


def _overrides_only(args: List[str]) -> List[str]:
    """The key=value arguments among Hydra's command line (flags and their values left out)."""
    flags_with_value = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                        "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in flags_with_value:
            skip = True
            continue
        if arg.startswith("-"):
            continue
        out.append(arg)
    return out


def _as_worker(hydra_args: List[str], recipe_dirs: List[str]) -> List[str]:
    """A distributed run's processes (launched by `qwenvl-ft train dist=...` itself, torchrun, accelerate launch
    or srun) agree on one run name before Hydra names the run folder, and every process it launches finds the same
    recipe folders; only the main process logs below warnings to the console."""
    import os

    from qwenvl_ft.config.compose import RECIPES_ENV
    from qwenvl_ft.distributed import launch, ranks

    if recipe_dirs:
        os.environ[RECIPES_ENV] = os.pathsep.join([d for d in os.environ.get(RECIPES_ENV, "").split(os.pathsep)
                                                   if d] + [str(Path(d).resolve()) for d in recipe_dirs])
    if any(arg in ("--cfg", "-c", "--help", "-h", "--info", "-i", "-m", "--multirun") for arg in hydra_args):
        return hydra_args
    hydra_args = launch.prepare_worker(hydra_args)
    if not ranks.is_main_process():
        # Each other rank logs everything to its own file in the run folder and only warnings to the console, and
        # leaves .hydra/ (the run's composed config) to the main process.
        own_log = f"${{hydra.runtime.output_dir}}/${{hydra.job.name}}.rank{ranks.rank()}.log"
        hydra_args += [f"hydra.job_logging.handlers.file.filename={own_log}",
                       "+hydra.job_logging.handlers.console.level=WARNING", "hydra.output_subdir=null"]
    return hydra_args


def _show_generated_deepspeed_config(hydra_args: List[str]) -> None:
    """`train --cfg job` of a DeepSpeed run: after the config, the DeepSpeed config generated from it (as YAML
    comments, so that the output stays valid YAML)."""
    import json

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=_overrides_only(hydra_args))
    if cfg.dist.engine != "deepspeed":
        return
    from qwenvl_ft.distributed.zero import deepspeed_config

    generated = json.dumps(deepspeed_config(cfg), indent=2)
    print("# DeepSpeed config generated from dist.zero and the settings above (qwenvl_ft/distributed/zero.py);\n"
          "# transformers fills each \"auto\" from the TrainingArguments and the model when the run starts:\n"
          + "\n".join(f"#   {line}" for line in generated.splitlines()))


def main(argv: List[str] | None = None) -> int:
    from qwenvl_ft.modeling.peft_import import defer_bitsandbytes
    from qwenvl_ft.quiet import keep_progress_bars_to_terminals, silence_library_noise

    silence_library_noise()
    keep_progress_bars_to_terminals()
    defer_bitsandbytes()  # bitsandbytes is imported by runs that quantise only
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    try:
        status, hydra_args = _prepare(command, rest)
    except ConfigError as err:
        print(f"qwenvl-ft: config error: {err}", file=sys.stderr)
        return 2
    if status is not None:
        return status
    return _run(command, rest, hydra_args)


def _prepare(command: str, rest: List[str]) -> Tuple[Optional[int], List[str]]:
    """Everything before Hydra runs the command: recipe folders and files registered, the answers that need no
    Hydra run given, the override and recipe keys checked. (exit status, []) when the command is answered;
    (None, Hydra's arguments) when Hydra is to run it."""
    recipe_dirs, hydra_args = _split_recipe_dirs(rest)
    recipe_files, hydra_args = _split_recipe_file(hydra_args)
    config_name = COMMANDS[command][0] if command in COMMANDS else None
    register_all(recipe_dirs, recipe_files, config_name, recipes_chosen(command, hydra_args, recipe_files))
    if recipe_files:
        hydra_args.insert(0, f"recipe={Path(recipe_files[0]).stem}")  # before any flag (Hydra's argparse)
    status = _answer_directly(command, hydra_args, recipe_dirs)
    if status is not None:
        return status, []
    _check_keys(command, hydra_args, recipe_dirs, recipe_files)
    if command == "train":  # launched processes find a recipe file through its folder
        hydra_args = _as_worker(hydra_args, recipe_dirs + [str(Path(f).parent) for f in recipe_files])
    return None, hydra_args


def recipes_chosen(command: str, hydra_args: List[str], recipe_files: List[str]) -> Optional[List[str]]:
    """The recipes a command line chooses (a name, a sweep's names, a recipe file), the only ones the command
    reads; None (all of them) where more may be needed: `recipes`, Hydra's --help or --info, a sweep over recipes
    by range or glob, a sweeper's own search space, or a command line Hydra cannot parse (it says why)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    if command not in COMMANDS or {"-h", "--help", "--hydra-help", "-i", "--info"} & set(hydra_args):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(_overrides_only(hydra_args))
    except Exception:
        return None
    names = [Path(f).stem for f in recipe_files]
    for override in parsed:
        key = override.key_or_group
        if key == "sweep" or key.startswith("hydra.sweeper"):
            return None
        if key.split("@")[0] == "recipe":
            if not isinstance(override.value(), (str, ChoiceSweep)):
                return None
            names += choice_values(override)
    return names


def _answer_directly(command: str, hydra_args: List[str], recipe_dirs: List[str]) -> Optional[int]:
    """The exit status of what is answered without a Hydra run (`recipes`, `doctor`, an unknown command,
    `COMMAND --help`); None for a command Hydra runs."""
    if command == "recipes":
        from qwenvl_ft.config.recipe_files import BROKEN

        for name, path in available_recipes(recipe_dirs).items():
            print(f"{name:28s} {path}" + (f"  (cannot be used: {BROKEN[name]})" if name in BROKEN else ""))
        return 0
    if command in NO_CONFIG:
        return _task(NO_CONFIG[command])()
    if command not in COMMANDS:
        print(f"qwenvl-ft: unknown command '{command}'. Valid commands: {', '.join(COMMANDS)}, recipes, doctor",
              file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in hydra_args):
        from qwenvl_ft.config.describe import command_help

        print(command_help(command, _summary(command), root_schema(COMMANDS[command][0])))
        return 0
    return None


def _check_keys(command: str, hydra_args: List[str], recipe_dirs: List[str], recipe_files: List[str]) -> None:
    """Every override's key and every key of the chosen recipe is one of the command's config (ConfigError)."""
    root = root_schema(COMMANDS[command][0])
    overrides = _overrides_only(hydra_args)
    check_override_keys(overrides, root)
    recipe = available_recipes(recipe_dirs, recipe_files).get(chosen_recipe(overrides) or "")
    if recipe is not None:
        check_recipe_keys(recipe, root)


def _run(command: str, rest: List[str], hydra_args: List[str]) -> int:
    """Run the command under `@hydra.main` (one job, or a `-m` sweep), each job through runtime.run_task; the exit
    status."""
    import hydra

    config_name, target = COMMANDS[command]
    from qwenvl_ft.commands import runtime
    from qwenvl_ft.commands.runtime import run_task

    runtime.COMMAND_LINE[:] = [f"qwenvl-ft {command}"] + rest

    wrapped = hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")(
        lambda cfg: run_task(_task(target), cfg)
    )
    sys.argv = [f"qwenvl-ft {command}"] + hydra_args
    try:
        wrapped()
    except SystemExit as exit:  # a single run's config or data error (runtime.run_task): status 2, message shown
        return exit.code if isinstance(exit.code, int) else 1
    if command == "train" and {"--cfg", "-c"} & set(hydra_args):
        _show_generated_deepspeed_config(hydra_args)
    from qwenvl_ft.commands import sweep

    return 1 if sweep.FAILED_JOBS else 0


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
