"""The vision tower's patch embedding on a CPU as the matrix product it is.

Every Qwen-VL family embeds image and video patches with an `nn.Conv3d` whose kernel equals its stride and its
input: each patch arrives as one (channels, temporal, patch, patch) block and leaves as one vector, so every
output is the dot product of the flattened patch with a flattened kernel, a linear layer. On a CPU PyTorch's
Conv3d takes 6-8x the time of that matrix product (one thread: 6.6 ms against 1.1 ms for the tiny model's 700
patches of a packed batch; 390 ms against 50 ms for 2,000 patches of a 1280-wide embedding, as in Qwen2-VL-2B),
which made the patch embedding the largest single operator of a tiny-model step (docs/performance.md,
"qwenvl-ft against LLaMA-Factory (CPU)").

`embed_patches_as_matmul` changes the class of each such Conv3d of the model to `PatchConv3d`, a Conv3d subclass
(same parameters, same state dict, same hooks) whose forward, for a CPU input of exactly one kernel-sized block
per patch, computes `F.linear` over the flattened patches with the flattened kernel; anything else (another device,
another input shape) goes to Conv3d's own forward. The result equals the convolution's up to float summation
order; tests/test_patch_embed.py checks the vision tower's output and the patch embedding's gradients against
Conv3d for every model family. On a GPU the convolution runs as before (not measured here).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PatchConv3d(nn.Conv3d):
    """nn.Conv3d with kernel == stride, no padding, dilation or groups; on a CPU, one matrix product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 5 or tuple(x.shape[2:]) != tuple(self.kernel_size):
            return super().forward(x)
        patches = F.linear(x.reshape(x.shape[0], -1), self.weight.reshape(self.out_channels, -1), self.bias)
        return patches.view(x.shape[0], self.out_channels, 1, 1, 1)


def _one_output_per_block(conv: nn.Conv3d) -> bool:
    return (tuple(conv.stride) == tuple(conv.kernel_size) and conv.padding in ((0, 0, 0), "valid")
            and tuple(conv.dilation) == (1, 1, 1) and conv.groups == 1)


def embed_patches_as_matmul(model: nn.Module) -> int:
    """Make every patch-embedding Conv3d of `model` a `PatchConv3d`; returns how many it changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Conv3d and _one_output_per_block(module):
            module.__class__ = PatchConv3d
            changed += 1
    return changed
