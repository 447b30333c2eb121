"""Loading a trained result for generation: the base model of the `model` group, plus an adapter folder, or a
full (fine-tuned or merged) model folder instead.

The base always comes from the config (the same recipe as training), because a random-init or local base is named
by a path that only the config knows how to rebuild; the adapter's own `base_model_name_or_path` is only compared
with it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from qwenvl_ft.config.adapter import AdapterConfig
from qwenvl_ft.config.data import DataConfig
from qwenvl_ft.config.model import ModelConfig
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.modeling.build import DTYPES, build_processor, check_family, model_class, model_source, \
    quantization_config
from qwenvl_ft.modeling.peft_import import import_peft_without_bitsandbytes
from qwenvl_ft.modeling.varlen_attention import TORCH, choose, keep_cudnn_out_of_sdpa, use_for_vision

log = logging.getLogger("qwenvl_ft")

ADAPTER_CONFIG = "adapter_config.json"


def kind_of(path: Path) -> str:
    """'adapter' or 'model' (a folder holding a full model), or a ConfigError naming what is missing."""
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "model"
    if not path.exists():
        raise ConfigError(f"{path}: no such folder. Name the training run with run_name=NAME (as given to "
                          f"`qwenvl-ft train`) or give the folder itself (eval.model_path, infer.model_path, "
                          f"merge.adapter_path)")
    raise ConfigError(f"{path}: neither an adapter ({ADAPTER_CONFIG}) nor a model folder (config.json)")


def _has_processor(path: Path) -> bool:
    return any((path / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))


def _load_for_generation(model_cfg: ModelConfig, source: str, dtype: Optional[str] = None,
                         quant=None) -> nn.Module:
    # Generation runs on one device: the first GPU when there is one (4-bit weights are quantised as they land).
    from qwenvl_ft.modeling.locate import loading

    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
    import_peft_without_bitsandbytes()
    keep_cudnn_out_of_sdpa()
    with loading(source):
        check_family(model_cfg, source)
        model = model_class(model_cfg).from_pretrained(
            source, dtype=DTYPES[dtype or model_cfg.dtype.value],
            attn_implementation=model_cfg.attn_implementation.value, quantization_config=quant,
            trust_remote_code=model_cfg.trust_remote_code, device_map=device_map,
        )
    model.config.use_cache = True
    if choose(model_cfg.varlen_attention.value, dtype or model_cfg.dtype.value).path == TORCH:
        use_for_vision(model)  # the prompt's images in one kernel call per block, as in training
    return model.eval()


def load_base(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, quantize: bool = True,
              dtype: Optional[str] = None) -> nn.Module:
    """The base model for generation; 4-bit when the adapter trained on a 4-bit base (and `quantize`)."""
    quant = quantization_config(model_cfg, adapter_cfg) if quantize else None
    return _load_for_generation(model_cfg, model_source(model_cfg), dtype, quant)


def adapter_config(path: Path) -> dict:
    """The adapter folder's adapter_config.json, once it and its weights are checked whole (a ConfigError naming
    the damaged file and what to do, before anything loads: config/run_files.py)."""
    from qwenvl_ft.config.run_files import read_json, safetensors_problem

    remedy = (f"The adapter in {path} cannot be loaded without it: copy the same file from the run's newest "
              f"checkpoint-*/ (or train again)")  # checkpoints hold the adapter's files too
    config = read_json(path / ADAPTER_CONFIG, remedy)
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ConfigError(f"{path}: {problem}. Copy the same file from the run's newest checkpoint-*/ (or "
                              f"train again)")
    if not isinstance(config, dict):
        raise ConfigError(f"{path / ADAPTER_CONFIG} is damaged (not a JSON object). {remedy}")
    return config


def attach(base: nn.Module, model_cfg: ModelConfig, path: Path) -> nn.Module:
    """base + the adapter in `path` (PEFT), ready for generation."""
    import_peft_without_bitsandbytes()
    from peft import PeftModel

    declared = adapter_config(path).get("base_model_name_or_path")
    source = model_source(model_cfg)
    if declared and Path(declared).expanduser().resolve() != Path(source).expanduser().resolve() \
            and declared != source:
        log.warning("%s was trained on %s; loading it onto %s (the model group of this config)", path, declared,
                    source)
    return PeftModel.from_pretrained(base, str(path), is_trainable=False).eval()


def load_tuned(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, path: Path,
               base: Optional[nn.Module] = None) -> nn.Module:
    """The fine-tuned model in `path`; an adapter goes onto `base` (loaded when not given)."""
    if kind_of(path) == "adapter":
        return attach(base if base is not None else load_base(model_cfg, adapter_cfg), model_cfg, path)
    check_model_folder(path)
    return _load_for_generation(model_cfg, str(path))  # a full (fine-tuned or merged) model


def check_model_folder(path: Path) -> None:
    """A full model's config.json and weights, checked whole before transformers reads them (config/run_files.py)."""
    from qwenvl_ft.config.run_files import read_json, safetensors_problem

    remedy = f"The model in {path} cannot be loaded: train (or merge) it again, or copy it from a checkpoint-*/"
    read_json(path / "config.json", remedy)
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ConfigError(f"{path}: {problem}. {remedy}")


def load_processor(model_cfg: ModelConfig, data_cfg: DataConfig, path: Optional[Path] = None):
    """The processor saved with the fine-tuned result when there is one, else the base's."""
    source = str(path) if path is not None and _has_processor(path) else model_source(model_cfg, weights=False)
    return build_processor(model_cfg, data_cfg, source)
