"""model.compile: the decoder layers compiled one by one (qwenvl_ft/training/speed.py: compile_decoder_layers)
give eager's losses and gradients, and packs padded to exactly the token budget (qwenvl_ft/data/packing.py:
PackingCollator's `pad_to`, data/batching.py's `fixed_packs`) keep one shape, so the graph is traced once, and
train exactly as the unpadded packs do."""

import pytest
import torch

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.data.shapes import make_rows

from family_models import DEFAULT_MODEL, TEST_MODELS

BUDGET = 256


def _setup(option, *overrides):
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.modeling.build import build_model, build_processor
    from qwenvl_ft.modeling.varlen_attention import NAME, use_for_language_model

    typed = validate(compose(["recipe=demo", f"model={option}", "adapter=full", "data.packing=true",
                              f"data.max_tokens_per_batch={BUDGET}", *overrides], output_dir="/tmp/unused"))
    collator = VisionChatCollator(build_processor(typed.model, typed.data), typed.data)
    torch.manual_seed(0)
    model = build_model(typed.model, typed.adapter).train()
    use_for_language_model(model, NAME)  # what finish_trainer does for data.packing on a CPU: per-sample attention
    return typed, collator, model


def _packs(typed, collator, model, fixed: bool, count: int):
    from qwenvl_ft.data.batching import training_batches
    from qwenvl_ft.data.packing import position_function

    rows = make_rows(12, 56, seed=0, split="train")
    batches = training_batches(typed.data, 1, collator, rows, seed=0, positions=position_function(model.config),
                               fixed_packs=fixed)
    return [batches.collator([batches.dataset[i]]) for i in range(min(count, len(batches.dataset)))]


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(first, second, rtol, atol):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("option", TEST_MODELS)
def test_packs_padded_to_the_budget_have_one_shape_and_train_as_unpadded_packs(option):
    # The router's load-balancing loss (mixture-of-experts families) counts every token of a pack, the filler's
    # too (a pack has no attention_mask to leave it out): the one term that differs, 0.001 x it by default.
    typed, collator, model = _setup(option, "model.router_aux_loss_coef=0")
    fixed, free = _packs(typed, collator, model, True, 2), _packs(typed, collator, model, False, 2)
    assert {tuple(pack["input_ids"].shape) for pack in fixed} == {(1, BUDGET)}
    assert {tuple(pack["position_ids"].shape) for pack in fixed} == {(4, 1, BUDGET)}
    assert any(pack["input_ids"].shape[-1] < BUDGET for pack in free)  # the padding was really needed
    for padded, unpadded in zip(fixed, free):
        length = unpadded["input_ids"].shape[-1]
        assert torch.equal(padded["input_ids"][:, :length], unpadded["input_ids"])
        assert (padded["labels"][:, length:] == -100).all()
        _assert_same(_loss_and_grads(model, unpadded), _loss_and_grads(model, padded), rtol=1e-5, atol=1e-6)


def test_compiled_decoder_layers_give_eager_losses_and_gradients_without_recompiling():
    import torch._dynamo
    from torch._dynamo.utils import counters

    from qwenvl_ft.training.speed import compile_decoder_layers

    typed, collator, eager = _setup(DEFAULT_MODEL)
    packs = _packs(typed, collator, eager, True, 2)
    reference = [_loss_and_grads(eager, pack) for pack in packs]
    _, _, compiled = _setup(DEFAULT_MODEL)
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(compiled) == typed.model.architecture.num_hidden_layers
    graphs = []
    for pack, expected in zip(packs, reference):
        _assert_same(expected, _loss_and_grads(compiled, pack), rtol=1e-4, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0  # the layers really ran compiled
    assert graphs[1:] == graphs[:1] * (len(graphs) - 1), graphs  # same shapes: traced once, never again
