"""The SFT loss's LM head on a CPU, for a vocabulary that fits one of TRL's tiles.

TRL 1.16's SFTTrainer replaces the model's forward with a fused LM head (`trl.trainer.utils.add_fused_lm_head`):
with `fused_lm_head=True` it returns per-token log-probabilities, entropy and top-1 flags (`FusedCausalLMOutput`)
without materialising the (tokens, vocabulary) logits, tiling the vocabulary in chunks of
`_CHUNKED_LOGPROB_CHUNK_SIZE` (32768) columns and the tokens in `TOKEN_CHUNK_SIZE` (4096) rows. On CUDA a Triton
kernel folds each tile; on a CPU TRL folds it with about a dozen whole-tile torch ops forward and twenty backward,
over every position (padding and prompt included), and recomputes the projection in the backward. When the
vocabulary fits one tile, TRL's CPU path holds that full-width tile, and several temporaries of its size, anyway,
so tiling saves no memory there; it only costs time: on the tiny model (vocabulary 1024) 15 ms of a 60 ms step
(docs/performance.md, "qwenvl-ft against LLaMA-Factory (CPU)").

`add_cpu_lm_head` wraps the forward TRL installed and, only where that is so -- a CPU, a vocabulary of at most one
TRL tile, at most one token tile of label positions, and none of the logit transforms TRL supports and Qwen-VL
models lack (temperature, soft-capping, logit scales, MoE router losses, sharded DTensor weights) -- computes the
same `FusedCausalLMOutput` from the label positions' logits: one projection, `log_softmax`, a gather. Everywhere
else (every GPU run, a 152k vocabulary on a CPU, tests that narrow TRL's tile) TRL's fused head runs unchanged,
so the memory estimate (qwenvl_ft/estimate/memory.py, TRL's tiles on a GPU) is untouched. The loss and its
gradients equal TRL's (float rounding aside), and so do the logged entropy and mean token accuracy; the one
difference is that this `entropy` carries no gradient (SFTTrainer only logs it, detached), which saves keeping a
second (labels, vocabulary) tensor for the backward. tests/test_sft_lm_head.py checks all of it.

Why a wrapper of the model's forward rather than an SFTTrainer.compute_loss override: TRL's compute_loss (DFT,
`compute_loss_func`, label smoothing, sequence parallelism, token counts, metrics) stays TRL's, and the wrapper
has TRL's own contract (an instance `forward` taking `fused_lm_head`), installed the way TRL installs its head.
"""

from __future__ import annotations

import functools
import types

import torch
from torch.nn import functional as F

TOKEN_TILE = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE: TRL's CPU fold holds this many rows at once
# Text-config settings TRL's head honours (logit transforms, MoE router losses); the head here steps aside for them.
_LEFT_TO_TRL = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling", "output_router_logits")


def add_cpu_lm_head(model) -> None:
    """Wrap `model.forward` (the base model, after SFTTrainer added TRL's fused head to it) as described above."""
    fused_forward = model.forward
    text_config = model.config.get_text_config()
    transforms = any(getattr(text_config, name, None) for name in _LEFT_TO_TRL)

    @functools.wraps(type(model).forward)  # generate() checks its keyword arguments against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        targets = labels[:, 1:] if shift_labels is None and labels is not None else shift_labels
        if not (fused_lm_head and not transforms and _fits_one_tile(self, targets)
                and not kwargs.get("output_router_logits")):
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden = hidden[:, :-1]
        return label_position_outputs(hidden, targets, self.get_output_embeddings(), num_items_in_batch)

    model.forward = types.MethodType(forward, model)


def _fits_one_tile(model, targets) -> bool:
    from trl.trainer import utils as trl_utils

    weight = model.get_output_embeddings().weight
    return (targets is not None and weight.device.type == "cpu" and type(weight) is torch.nn.Parameter
            and weight.shape[0] <= trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE  # read per call: tests narrow it
            and int((targets != -100).sum()) <= TOKEN_TILE)


def label_position_outputs(hidden: torch.Tensor, targets: torch.Tensor, lm_head, num_items_in_batch=None):
    """TRL's `FusedCausalLMOutput` for hidden states (batch, positions, hidden) and their next-token `targets`
    (batch, positions; -100 where ignored), from the logits of the label positions only."""
    from trl.trainer.utils import FusedCausalLMOutput

    mask = targets != -100
    picked = hidden[mask]
    labels = targets[mask]
    logits = F.linear(picked, lm_head.weight, lm_head.bias)
    all_log_probs = logits.float().log_softmax(-1)
    log_probs = all_log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        detached = all_log_probs.detach()
        entropy = -(detached.exp() * detached).sum(-1)
        # argmax returns the first maximum: a tie with an earlier token is not a top-1 prediction, as in TRL
        is_top1 = logits.detach().argmax(-1) == labels

    def spread(values):  # masked_scatter keeps the output connected to the model even with no label at all
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    log_probs = spread(log_probs)
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=spread(entropy),
                               is_top1=spread(is_top1), label_mask=mask)
