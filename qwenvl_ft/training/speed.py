"""The speed switches every method shares: Liger kernels (checked here; Liger's own patch through
TrainingArguments, or the family's modules swapped for Liger's by modeling/liger.py),
regional torch.compile of the decoder layers, vision-tower gradient checkpointing apart from the decoder's, and the
varlen attention of packed rows and images. The batch layouts (padded, length-grouped, token budget, packed) are
data/batching.py's, chosen by the SFT method. And the torch threads of a small model on a CPU."""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from typing import Optional, Sequence

from qwenvl_ft.config.model import ModelConfig
from qwenvl_ft.errors import ConfigError

log = logging.getLogger("qwenvl_ft")

# A model this small trains and generates on one torch thread on a CPU: a step is a few hundred ops on tensors of a
# few thousand values, which gain nothing from a second thread, and on a busy machine each op waits at the thread
# pool's barrier for a descheduled thread (the demo on 2 cores at load 3.5: its 48 held-out rows 3.8-4.5 s on two
# threads, 0.2-0.3 s on one; a training step 0.46-1.9 s against 0.05-0.08 s; docs/performance.md, "Start-up
# budget"). The smallest Qwen-VL checkpoints are ~20x larger, and their products gain from every thread.
ONE_THREAD_BELOW_PARAMETERS = 50_000_000


def check_liger(model_cfg: ModelConfig) -> None:
    """model.use_liger_kernel=true: the package installed, the family's Liger modules declared or else Liger able
    to patch this family with the installed transformers (`liger_problem`), and a CUDA GPU for its Triton kernels;
    else a one-line ConfigError."""
    if not model_cfg.use_liger_kernel:
        return
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("model.use_liger_kernel=true needs the liger-kernel package (pip install liger-kernel; "
                          "its Triton kernels run on CUDA GPUs only)")
    problem = None if liger_by_us(model_cfg) else liger_problem(model_cfg.family.value)
    if problem is not None:
        raise ConfigError(f"model.use_liger_kernel=true: {problem}; set model.use_liger_kernel=false")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("model.use_liger_kernel=true needs a CUDA GPU (Liger's kernels are Triton kernels); set "
                          "model.use_liger_kernel=false on this machine")


def liger_by_us(model_cfg: ModelConfig) -> bool:
    """Whether qwenvl-ft swaps in Liger's modules itself (the family declares `liger_modules`:
    modeling/liger.py) rather than the Trainer applying Liger's own patch (TrainingArguments.use_liger_kernel,
    which must then stay off: its patch module fails to import for these families)."""
    from qwenvl_ft import families

    return bool(families.get(model_cfg.family.value).liger_modules)


def trainer_applies_liger(model_cfg: ModelConfig) -> bool:
    """TrainingArguments.use_liger_kernel: Liger's own patch, applied by the Trainer, for the families we do not
    swap ourselves."""
    return model_cfg.use_liger_kernel and not liger_by_us(model_cfg)


def use_liger(models: Sequence, model_cfg: ModelConfig) -> Optional[str]:
    """model.use_liger_kernel on a family that declares `liger_modules`: swap them on each model (a DPO reference
    model too) and say in the run log what was swapped. None (nothing done) otherwise."""
    if not (model_cfg.use_liger_kernel and liger_by_us(model_cfg)):
        return None
    from qwenvl_ft import families
    from qwenvl_ft.modeling.liger import use_liger_modules

    classes = families.get(model_cfg.family.value).load_liger_classes()
    counts: dict = {}
    for model in models:
        if model is not None:
            for kind, count in use_liger_modules(model, classes).items():
                counts.setdefault(kind, Counter()).update(count)
    swapped = ", ".join(f"{kind} x{count['swapped']}" + (f" ({count['eager']} eager)" if count["eager"] else "")
                        for kind, count in counts.items())
    line = (f"Liger kernels: modules swapped for Liger's ({swapped}); RoPE eager; LM head and loss: TRL's fused "
            f"head")
    log.info(line)
    return line


def liger_problem(family: str) -> Optional[str]:
    """Why the installed Liger Kernel cannot patch this family's models, or None if it can.

    The Trainer applies Liger by model type (`_apply_liger_kernel_to_instance`); a type Liger does not know is
    silently left unpatched, and a patch function whose own module fails to import breaks the Trainer's start.
    With liger-kernel 0.8.5 on transformers 5.x that module fails for the three families that therefore declare
    `liger_modules` (it subclasses per-model output classes transformers 5 no longer has), so this only decides
    for a family that declares none. Asked of the installed packages (tests/test_liger.py checks the answer
    against a real patch)."""
    import importlib
    from importlib.metadata import version

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    liger = f"Liger Kernel {version('liger-kernel')}"
    if family not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"{liger} has no kernels for {family} models"
    module = f"liger_kernel.transformers.model.{family}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        # no module of that name at all: the patch function imports its own elsewhere; else one it needs is missing
        if error.name != module:
            return f"{liger} cannot patch {family} models with transformers {version('transformers')} ({error})"
    except ImportError as error:
        return f"{liger} cannot patch {family} models with transformers {version('transformers')} ({error})"
    return None


def compile_decoder_layers(model) -> int:
    """model.compile: torch.compile each decoder layer in place (regional compilation, as in the transformers and
    PyTorch recipes: the layers share their code, so one graph is traced and reused by all of them; compiling
    takes seconds where the whole model takes minutes, and the vision tower, the image scatter, the sample
    boundaries and TRL's fused loss stay eager). Gradient checkpointing wraps the compiled layer. Returns how many
    layers were compiled."""
    from qwenvl_ft.modeling.build import model_parts

    layers = model_parts(model).decoder_layers
    for layer in layers:
        layer.compile()
    log.info("model.compile: %d decoder layers compiled (torch.compile, regional)", len(layers))
    return len(layers)


def set_vision_checkpointing(model, enabled: bool) -> int:
    """Turn gradient checkpointing of the vision blocks on or off, leaving the decoder layers as they are.

    transformers' `gradient_checkpointing_enable` flags every checkpointable layer, ViT blocks included; this
    re-sets the flag on the vision blocks only. Returns how many blocks were set.
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    from qwenvl_ft.modeling.build import model_parts

    blocks = model_parts(model).vision_blocks
    for block in blocks:
        if enabled:  # non-reentrant, like every checkpointing qwenvl-ft sets up
            block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        block.gradient_checkpointing = enabled
    return len(blocks)


def vision_checkpointing_callback(enabled: bool):
    """Applies `set_vision_checkpointing` when training starts, i.e. after the Trainer has enabled (or not)
    gradient checkpointing model-wide."""
    from transformers import TrainerCallback

    class VisionCheckpointing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                set_vision_checkpointing(model, enabled)

    return VisionCheckpointing()


def varlen_attention(models: Sequence, model_cfg: ModelConfig, packing: bool) -> str:
    """Set up the varlen attention path (`model.varlen_attention`, qwenvl_ft/modeling/varlen_attention.py) on each
    model (a DPO reference model too) and say in the run log which one runs. The language model switches only for
    packed rows (a padded batch has nothing to gain), the vision tower for every batch under `torch` (all images
    of a batch in one call per block). A model on flash_attention_2 or eager keeps its own kernels. Returns the
    log line."""
    from qwenvl_ft.modeling.varlen_attention import NAME, TORCH, TORCH_NAME, choose, use_for_language_model, \
        use_for_vision

    choice = choose(model_cfg.varlen_attention.value, model_cfg.dtype.value)
    kernel = choice.path == TORCH
    language = vision = False
    for model in models:
        if model is None:
            continue
        if packing:
            language |= use_for_language_model(model, TORCH_NAME if kernel else NAME)
        if kernel:
            vision |= use_for_vision(model)
    if not (language or vision or model_cfg.attn_implementation.value == "sdpa"):
        line = (f"attention: model.attn_implementation={model_cfg.attn_implementation.value} everywhere "
                f"(model.varlen_attention applies to sdpa)")
    elif kernel:
        line = (f"varlen attention: torch's varlen_attn ({choice.reason}); "
                + ("packed rows: one kernel call per decoder layer; " if language else "")
                + "vision tower: all images of a batch in one kernel call per block")
    else:
        line = (f"varlen attention: per-sample SDPA ({choice.reason}); "
                + ("packed rows: one SDPA call per sample; " if language else "")
                + "vision tower: one SDPA call per image")
    log.info(line)
    return line


def small_model_threads(model, device=None, say: str = ""):
    """data/workers.py `one_thread` while `model`, under ONE_THREAD_BELOW_PARAMETERS, runs on a CPU (`device`,
    default: its parameters'); the threads as they are otherwise. With `say` (what runs), the run log says so when
    it takes the thread count down (a user's OMP_NUM_THREADS does not apply then)."""
    import contextlib

    from qwenvl_ft.data.workers import one_thread

    parameters = list(model.parameters())
    device = device if device is not None else (parameters[0].device if parameters else None)
    small = sum(p.numel() for p in parameters) < ONE_THREAD_BELOW_PARAMETERS
    if not (device is not None and device.type == "cpu" and small):
        return contextlib.nullcontext()
    import torch

    if say and torch.get_num_threads() > 1:
        log.info(f"{say}: one torch thread (a model under {ONE_THREAD_BELOW_PARAMETERS // 1_000_000}M parameters "
                 f"on a CPU gains nothing from {torch.get_num_threads()})")
    return one_thread()
