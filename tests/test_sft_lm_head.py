"""The SFT loss (qwenvl_ft/trainers/sft.py: TRL's SFTTrainer) never holds the (tokens, vocabulary) logits, on CPU
too: TRL 1.16 adds a fused LM head (`trl.trainer.utils.add_fused_lm_head`) that projects the label positions in
tiles of the vocabulary and folds each tile into a running log-sum-exp, in Triton on CUDA and in torch elsewhere.
That is why qwenvl-ft needs neither Liger's fused linear cross-entropy (TRL turns it off) nor cut-cross-entropy
for a 152k vocabulary. TRL's tile is 32768 columns; the test narrows it so the tiny model's 1024 columns span
four tiles, and watches every tensor the forward and backward create.

On a CPU with a vocabulary that fits one of TRL's tiles, qwenvl_ft/modeling/cpu_lm_head.py scores the label
positions' logits instead (TRL's tiles save nothing there, and cost a quarter of a tiny-model step): the second test
checks that its loss, every gradient and the logged entropy and token accuracy equal TRL's fused head's, for every
model family."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qwenvl_ft.config.compose import compose, validate

from qwenvl_ft.data.shapes import make_rows
from family_models import TEST_MODELS, family_of_option


class _VocabularyWide(TorchDispatchMode):
    """Records the shape of every tensor an operator returns whose last dimension spans the whole vocabulary, but
    for `other_widths`: the patch embedding's flattened patches and kernel (channels x temporal x patch x patch,
    1176 or 1536 against the tiny models' 1024-token vocabulary; modeling/patch_embed.py), which are not logits."""

    def __init__(self, vocab: int, other_widths=()):
        super().__init__()
        self.vocab, self.other_widths, self.shapes = vocab, set(other_widths), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() > 1 and tensor.shape[-1] >= self.vocab \
                    and tensor.shape[-1] not in self.other_widths:
                self.shapes.append((str(func), tuple(tensor.shape)))
        return out


def _patch_widths(model):
    return {module.weight[0].numel() for module in model.modules() if isinstance(module, torch.nn.Conv3d)}


def _sft_trainer(tmp_path, overrides):
    from qwenvl_ft.data.arrow import to_dataset
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.modeling.build import build_model, build_processor
    from qwenvl_ft.trainers.sft import build_trainer

    typed = validate(compose(["recipe=demo", "trainer.report_to=[none]", *overrides], output_dir=str(tmp_path)))
    processor = build_processor(typed.model, typed.data)
    collator = VisionChatCollator(processor, typed.data)
    torch.manual_seed(0)
    model = build_model(typed.model, typed.adapter)
    rows = make_rows(3, 56, seed=0, split="train")
    trainer = build_trainer(typed, model, processor, collator, to_dataset(rows), None)
    model.train()  # the step logs its metrics under "train"
    return trainer, model, trainer._prepare_inputs(collator(rows)), typed.model.architecture.vocab_size


def test_sft_loss_and_gradients_come_from_vocabulary_tiles_not_full_logits(tmp_path, monkeypatch):
    import trl.trainer.utils

    trainer, model, batch, vocab = _sft_trainer(tmp_path, ["adapter=full"])
    monkeypatch.setattr(trl.trainer.utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", vocab // 4)
    assert batch["input_ids"].shape[-1] < vocab  # no other tensor is as wide as the vocabulary

    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    with _VocabularyWide(vocab, _patch_widths(model)) as watched:
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert not watched.shapes, watched.shapes
    assert not head_calls  # the LM head module is never run: its weight is read tile by tile

    model.zero_grad()
    # the model's own loss: full logits, which the mode sees
    with _VocabularyWide(vocab, _patch_widths(model)) as reference_watch:
        reference = model(**{k: v for k, v in batch.items()}, fused_lm_head=False).loss
        reference.backward()
    assert any(shape[-1] == vocab for _, shape in reference_watch.shapes)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def _step(trainer, model, batch):
    """Loss, every gradient, and the entropy and token accuracy the step logs."""
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    metrics = {key: trainer._metrics["train"][key][-1] for key in ("entropy", "mean_token_accuracy")}
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, metrics


@pytest.mark.parametrize("option", TEST_MODELS)
def test_cpu_head_equals_trls_fused_head(tmp_path, monkeypatch, option):
    import trl.trainer.utils

    trainer, model, batch, vocab = _sft_trainer(tmp_path, [f"model={option}", "adapter=full"])
    targets = batch["labels"][:, 1:]
    label_count = int((targets != -100).sum())
    assert 0 < label_count < targets.numel()  # prompts and padding are ignored positions
    with _VocabularyWide(vocab, _patch_widths(model)) as watched:
        ours = _step(trainer, model, batch)
    if family_of_option(option).expert_parameters:  # the MoE router loss is left to TRL's head
        assert ("aten.mm.out", (targets.numel(), vocab)) in watched.shapes, watched.shapes
        return
    # the CPU head ran: logits of the label positions only (TRL's CPU fold scores every position); the other
    # vocabulary-wide tensors are the head weight's transposes (hidden size rows)
    hidden = model.get_output_embeddings().weight.shape[1]
    assert targets.numel() not in (label_count, hidden)
    assert ("aten.mm.default", (label_count, vocab)) in watched.shapes, watched.shapes
    assert {shape[0] for _, shape in watched.shapes} <= {label_count, hidden}, watched.shapes

    monkeypatch.setattr(trl.trainer.utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", vocab // 2)  # over one tile: TRL's head
    with _VocabularyWide(vocab, _patch_widths(model)) as watched:
        trls = _step(trainer, model, batch)
    assert not watched.shapes
    torch.testing.assert_close(ours[0], trls[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == trls[1].keys() and ours[1]
    for name, grad in trls[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for key, value in trls[2].items():
        assert ours[2][key] == pytest.approx(value, rel=1e-5), key


def test_cpu_head_with_no_label_gives_a_zero_loss_connected_to_the_model(tmp_path):
    trainer, model, batch, _ = _sft_trainer(tmp_path, [])
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, grads, metrics = _step(trainer, model, batch)
    assert loss.item() == 0.0 and grads
    assert metrics == {"entropy": 0.0, "mean_token_accuracy": 0.0}
