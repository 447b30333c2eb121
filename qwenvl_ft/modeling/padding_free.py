"""Padding-free execution of padded batches, for DPO: the language model runs only the real tokens, and the vision
tower encodes each chosen/rejected pair's shared images once.

Why not a packing collator, as for SFT: TRL's DPOTrainer computes its loss and every logged metric from outputs in
the padded (2 x pairs, length) layout: it sums per-token log-probabilities along each row and splits the rows into
chosen and rejected. TRL 1.16 turns `padding_free` off for DPO ("temporarily unavailable"), so reusing its loss
means the padding has to go inside the model instead:

  - `unpad_language_model`: a forward pre-hook on the language model gathers the real tokens of the padded batch
    (after the image features are merged in, and with the M-RoPE positions the model computed per row) into one
    packed row whose text positions restart at every sequence -- the same layout as an SFT pack, with its
    sequence offsets in transformers' varlen keywords (`row_boundaries`), so attention stays within each sequence
    (torch's varlen_attn, flash-attention varlen, `sdpa_varlen`, or a block mask with eager). A forward hook
    scatters the hidden states back into the padded layout, zeros at the padding, where the LM head and TRL's loss
    expect them. Decoder compute then follows the real token count: padding costs nothing but the scatter.
    Other per-token inputs the family's language model takes (`language_model_token_inputs`, such as
    `visual_pos_masks`, which places DeepStack features) are packed the same way; the DeepStack features
    themselves are one row per visual token, in the same order packed or padded, and pass unchanged.
  - `share_pair_images`: TRL's preference collator repeats every prompt's images for the rejected sequences, so
    the vision tower would encode each image twice per forward (and twice more in the reference forward). A
    forward pre-hook on the vision tower checks whether the second half of the batch's images is an exact copy
    of the first half (grids and pixel values compared, which costs a read of the pixels, not a ViT pass) and, if
    so, encodes the first half only; a forward hook repeats the features, every output field the family declares
    (`vision_output_fields`: merged features, last hidden state, a list of DeepStack features).
    Autograd sums the two uses' gradients, as it would for two encodings.

Both are PyTorch module hooks (`register_forward_pre_hook` / `register_forward_hook` with kwargs; the latter with
`always_call`, so that a forward that raises still pops its entry): no library code is replaced, and removing the
returned handles restores the model. Both step aside when they do not apply: a
cached forward (generation), a batch without an attention mask (already packed), images that are not repeated.
tests/test_dpo_packing.py checks that the DPO loss, metrics and every gradient equal those of the padded run.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from qwenvl_ft import families


def unpad_language_model(model: nn.Module) -> List[torch.utils.hooks.RemovableHandle]:
    """Run the language model of `model` (PEFT-wrapped or not) on the real tokens only."""
    family = families.of_model(model)
    language_model = family.parts(model).language_model
    kept: List[Optional[torch.Tensor]] = []  # the token mask of each forward in flight

    def pack(module, args, kwargs):
        mask, embeds = kwargs.get("attention_mask"), kwargs.get("inputs_embeds")
        applies = (not args and torch.is_tensor(mask) and mask.dim() == 2 and embeds is not None
                   and kwargs.get("past_key_values") is None and not kwargs.get("use_cache"))
        if not applies:
            kept.append(None)
            return None
        keep = mask.bool()
        text_positions = keep.long().cumsum(dim=1) - 1  # restarts at 0 in every row: the sequence boundaries
        positions = kwargs.get("position_ids")
        if positions is None:
            mrope = text_positions.unsqueeze(0).expand(3, -1, -1)
        else:
            mrope = positions[-3:] if positions.dim() == 3 else positions.unsqueeze(0).expand(3, -1, -1)
        packed_positions = torch.cat([text_positions[keep].view(1, 1, -1), mrope[:, keep].unsqueeze(1)], dim=0)
        kept.append(keep)
        per_token = {key: kwargs[key][keep].unsqueeze(0) for key in family.language_model_token_inputs
                     if torch.is_tensor(kwargs.get(key))}
        return args, {**kwargs, **per_token, **row_boundaries(keep), "inputs_embeds": embeds[keep].unsqueeze(0),
                      "position_ids": packed_positions, "attention_mask": None}

    def unpack(module, args, kwargs, output):
        keep = kept.pop()
        if keep is None or output is None:  # output is None when the forward raised (always_call)
            return None
        hidden = output.last_hidden_state
        padded = hidden.new_zeros(*keep.shape, hidden.shape[-1])
        output.last_hidden_state = padded.masked_scatter(keep.unsqueeze(-1), hidden[0])
        if getattr(output, "router_logits", None):
            output.router_logits = padded_router_logits(output.router_logits, keep)
        return output

    return [language_model.register_forward_pre_hook(pack, with_kwargs=True),
            language_model.register_forward_hook(unpack, with_kwargs=True, always_call=True)]


def row_boundaries(keep: torch.Tensor) -> dict:
    """transformers' varlen keywords for the packed real tokens of a padded batch (`keep`: its token mask), for a
    varlen kernel (modeling/varlen_attention.py): the offsets are computed on the device, and the longest sequence
    is bounded by the padded length instead of read back, which would cost a device sync (the kernels size their
    launch grid from it and stop at each sequence's own end)."""
    offsets = torch.nn.functional.pad(keep.sum(dim=1).cumsum(dim=0), (1, 0)).to(torch.int32)
    bound = keep.shape[1]
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": bound, "max_length_k": bound}


def padded_router_logits(router_logits, keep: torch.Tensor):
    """A mixture-of-experts model's router logits of the packed real tokens, back in the padded rows' layout (one
    (rows x length, experts) tensor per layer, zeros at the padding), where its load-balancing loss masks the
    padding out with the attention mask. The router is called once per layer, or once per sample of a layer that
    runs per sample (modeling/linear_attention.py): either way the calls of one layer cover its tokens in order."""
    flat = keep.reshape(-1, 1)
    per_layer = torch.cat(router_logits).view(-1, int(keep.sum()), router_logits[0].shape[-1])
    return tuple(layer.new_zeros(flat.shape[0], layer.shape[-1]).masked_scatter(flat, layer) for layer in per_layer)


def repeated_half(pixels: torch.Tensor, grid_thw: Optional[torch.Tensor]) -> Optional[int]:
    """Number of patches in the first half of the images when the second half repeats it exactly, else None."""
    if grid_thw is None or grid_thw.shape[0] % 2 or grid_thw.shape[0] == 0:
        return None
    images = grid_thw.shape[0] // 2
    if not torch.equal(grid_thw[:images], grid_thw[images:]):
        return None
    patches = int(grid_thw[:images].prod(dim=-1).sum())
    if 2 * patches != pixels.shape[0] or not torch.equal(pixels[:patches], pixels[patches:]):
        return None
    return patches


def share_pair_images(model: nn.Module) -> List[torch.utils.hooks.RemovableHandle]:
    """Encode a batch's images once when its second half repeats its first (a DPO batch: chosen, then rejected)."""
    family = families.of_model(model)
    visual = family.parts(model).vision
    shared: List[bool] = []

    def first_half(module, args, kwargs):
        pixels = args[0] if args else kwargs.get("hidden_states")
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        patches = repeated_half(pixels, grid) if torch.is_tensor(pixels) else None
        shared.append(patches is not None)
        if patches is None:
            return None
        images = grid.shape[0] // 2
        rest = {key: value for key, value in kwargs.items() if key not in ("hidden_states", "grid_thw")}
        return (pixels[:patches],), {**rest, "grid_thw": grid[:images]}

    def repeat(module, args, kwargs, output):
        if not shared.pop() or output is None:
            return None
        for name in family.vision_output_fields:
            value = getattr(output, name, None)
            if torch.is_tensor(value):
                setattr(output, name, torch.cat([value, value]))
            elif isinstance(value, (list, tuple)):
                setattr(output, name, type(value)(torch.cat([v, v]) for v in value))
        return output

    return [visual.register_forward_pre_hook(first_half, with_kwargs=True),
            visual.register_forward_hook(repeat, with_kwargs=True, always_call=True)]
