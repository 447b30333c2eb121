"""`qwenvl-ft doctor`: what this machine runs, for the top of a bug report.

The installed versions of the core stack against the range qwenvl-ft declares (pyproject.toml's dependencies,
read back from the installed package's metadata: the range CI runs at both ends), the optional packages and what
each enables, the accelerator, and which attention and kernel paths a run here can take. Versions are read from
package metadata, without importing the packages; only torch is imported (for the accelerator and its kernels).
Exit status 1 when a core package is missing or outside the tested range, 0 otherwise.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from typing import Dict, List, Optional, Tuple

# distribution names, in the order they are shown
CORE = ("torch", "torchvision", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets",
        "qwen-vl-utils", "hydra-core", "omegaconf", "huggingface-hub")
# distribution -> what it enables
OPTIONAL: Dict[str, str] = {
    "deepspeed": "dist=zero2 / zero3 / zero3_offload ([deepspeed])",
    "liger-kernel": "model.use_liger_kernel=true ([liger], CUDA)",
    "flash-attn": "model.attn_implementation=flash_attention_2 (CUDA)",
    "fla-core": "flash-linear-attention kernels (CUDA)",
    "vllm": "trainer.grpo.vllm.enabled=true ([vllm], CUDA)",
    "gradio": "qwenvl-ft chat ([ui])",
    "wandb": "trainer.report_to=[wandb] ([wandb])",
    "swanlab": "trainer.report_to=[swanlab] ([swanlab])",
    "mlflow": "trainer.report_to=[mlflow] ([mlflow])",
}


def installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def declared_ranges() -> Dict[str, str]:
    """distribution -> the version range qwenvl-ft declares for it (its unconditional dependencies)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        requirements = importlib.metadata.requires("qwenvl-ft") or []
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return {}
    ranges = {}
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is None:  # lower bound first
            bounds = sorted(map(str, requirement.specifier), key=lambda bound: not bound.startswith(">"))
            ranges[canonicalize_name(requirement.name)] = ",".join(bounds)
    return ranges


def core_rows(ranges: Dict[str, str]) -> Tuple[List[Tuple[str, str, str, str]], bool]:
    """(name, installed, tested range, verdict) per core package, and whether all are installed and in range."""
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    rows, healthy = [], True
    for name in CORE:
        version, declared = installed_version(name), ranges.get(canonicalize_name(name))
        if version is None:
            verdict, healthy = "MISSING", False
        elif declared is None:
            verdict = "(range unknown: qwenvl-ft is not installed)"
        elif SpecifierSet(declared).contains(version, prereleases=True):
            verdict = "ok"
        else:
            verdict, healthy = "OUTSIDE the tested range", False
        rows.append((name, version or "-", declared or "-", verdict))
    return rows, healthy


def accelerator_lines(torch) -> List[str]:
    if not torch.cuda.is_available():
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch build"
        return [f"no CUDA GPU ({built}): training runs on the CPU, in fp32"]
    lines = [f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
             f"{torch.cuda.device_count()} GPU(s)"]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        lines.append(f"GPU {index}: {props.name}, {props.total_memory / 2 ** 30:.1f} GiB, compute capability "
                     f"{props.major}.{props.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    return lines


def kernel_lines(torch) -> List[str]:
    """Which attention and kernel paths a run on this machine can take."""
    cuda = torch.cuda.is_available()

    def present(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    def path(name: str, module: str, needs_cuda: bool = True) -> str:
        if not present(module):
            return f"{name}: not installed"
        return f"{name}: {'available' if cuda or not needs_cuda else 'installed, but needs a CUDA GPU'}"

    varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    return [
        "sdpa (torch): available (the default attention)",
        f"torch varlen_attn (torch >= 2.10): "
        f"{('available' if cuda else 'in this torch, but needs a CUDA GPU') if varlen else 'not in this torch'}",
        path("flash-attention 2 (flash_attn)", "flash_attn"),
        path("Liger kernels (liger_kernel)", "liger_kernel"),
        path("flash-linear-attention (fla)", "fla"),
        path("DeepSpeed (builds its CUDA ops on first use)", "deepspeed", needs_cuda=False),
        path("bitsandbytes 4-bit (adapter=qlora)", "bitsandbytes", needs_cuda=False),
    ]


def report() -> Tuple[str, bool]:
    """The doctor's text, and whether the core stack is complete and inside the tested range."""
    import torch

    rows, healthy = core_rows(declared_ranges())
    lines = [f"qwenvl-ft {installed_version('qwenvl-ft') or '(not installed)'}, Python {platform.python_version()} "
             f"on {platform.platform()}", "", "core stack          installed        tested range        "]
    lines += [f"  {name:18s}{version:17s}{declared:20s}{verdict}" for name, version, declared, verdict in rows]
    lines += ["", "optional            installed        enables"]
    lines += [f"  {name:18s}{installed_version(name) or '-':17s}{enables}" for name, enables in OPTIONAL.items()]
    lines += ["", "accelerator"] + [f"  {line}" for line in accelerator_lines(torch)]
    lines += ["", "attention and kernel paths"] + [f"  {line}" for line in kernel_lines(torch)]
    if not healthy:
        lines += ["", "a core package is missing or outside the tested range: install qwenvl-ft again (in a "
                      "checkout, pip install -c constraints/ci.txt . installs the versions CI runs)"]
    return "\n".join(lines), healthy


def doctor() -> int:
    text, healthy = report()
    print(text)
    return 0 if healthy else 1
