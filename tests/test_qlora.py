"""QLoRA's 4-bit base as modeling/build.py prepares it (`prepare_4bit_model`): by default the weights that are not
4-bit stay in model.dtype, as TRL >= 1.16 leaves them; adapter.qlora_fp32_upcast casts them to fp32 (PEFT's
`prepare_model_for_kbit_training`). Both compute the same function; this checks that they train alike, on every
family that QLoRA serves (CPU, bf16 weights under bf16 autocast, as on a GPU)."""

import pytest
import torch

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.data.collate import VisionChatCollator

from family_models import TEST_MODELS
from test_estimate import _skip_qlora
from test_frozen_vision import ROWS

# bf16 keeps 8 significant bits: each rounding is off by at most 2^-8 relative. The two paths differ only in where
# values are rounded to bf16 (the lean one rounds the embeddings' and norms' outputs and the residual additions;
# the 4-bit matmuls and the LoRA factors run alike under autocast in both), so the loss, a mean over every token,
# stays within one rounding, and a gradient, which goes back through a few layers, within eight (2^-5; measured:
# at most 0.017, on Qwen3-VL). A wrong gradient (a LoRA factor missed, a scaling lost) is off by order 1.
LOSS_RTOL, GRAD_RTOL = 2 ** -8, 2 ** -5


def _loss_and_lora_grads(option: str, upcast: bool, lora_state=None):
    """One training forward and backward of the QLoRA model build_model makes (checkpointing on, the Trainer's
    input-grad hooks) on two captioned images; LoRA factors from `lora_state` when given, else B random (PEFT
    initialises it to zero, which would leave A without gradient)."""
    from qwenvl_ft.modeling.build import build_model, build_processor

    cfg = validate(compose(["recipe=demo", f"model={option}", "adapter=qlora", "model.dtype=bfloat16",
                            "model.gradient_checkpointing=true", "model.freeze_vision_tower=true",
                            "model.freeze_merger=true", "adapter.dropout=0.0",
                            "adapter.target_modules=[q_proj,v_proj,down_proj]",
                            f"adapter.qlora_fp32_upcast={str(upcast).lower()}"], output_dir="/tmp/unused"))
    model = build_model(cfg.model, cfg.adapter).train()
    model.enable_input_require_grads()  # what TRL does for a PEFT model with gradient checkpointing
    # before the forward: bitsandbytes casts a 4-bit Linear's bias to its input's dtype when it runs
    dtypes = {p.dtype for name, p in model.named_parameters()
              if "lora_" not in name and type(p).__name__ != "Params4bit"}
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    if lora_state is None:
        generator = torch.Generator().manual_seed(0)
        lora_state = {name: torch.randn(p.shape, generator=generator) * 0.02 if "lora_B" in name
                      else p.detach().clone() for name, p in lora.items()}
    with torch.no_grad():
        for name, p in lora.items():
            p.copy_(lora_state[name])
    batch = VisionChatCollator(build_processor(cfg.model, cfg.data), cfg.data)(ROWS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert model.is_gradient_checkpointing
    return loss.item(), {name: p.grad.float() for name, p in lora.items()}, dtypes, lora_state


@pytest.mark.parametrize("option", TEST_MODELS)
def test_lean_qlora_trains_like_the_fp32_upcast(option):
    _skip_qlora(option)
    lean_loss, lean_grads, lean_dtypes, state = _loss_and_lora_grads(option, upcast=False)
    upcast_loss, upcast_grads, upcast_dtypes, _ = _loss_and_lora_grads(option, upcast=True, lora_state=state)
    assert (lean_dtypes, upcast_dtypes) == ({torch.bfloat16}, {torch.float32})  # the paths do differ
    assert lean_grads.keys() == upcast_grads.keys() and any("lora_A" in name for name in lean_grads)
    assert abs(lean_loss - upcast_loss) <= LOSS_RTOL * abs(upcast_loss)
    for name, grad in upcast_grads.items():
        assert grad.norm() > 0, name
        assert (lean_grads[name] - grad).norm() <= GRAD_RTOL * grad.norm(), name
    assert any(not torch.equal(lean_grads[name], grad) for name, grad in upcast_grads.items())
