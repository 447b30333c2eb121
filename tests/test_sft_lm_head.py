"""The SFT loss (qwenvl_ft/trainers/sft.py: TRL's SFTTrainer) never holds the (tokens, vocabulary) logits, on CPU
too: TRL 1.16 adds a fused LM head (`trl.trainer.utils.add_fused_lm_head`) that projects the label positions in
tiles of the vocabulary and folds each tile into a running log-sum-exp, in Triton on CUDA and in torch elsewhere.
That is why qwenvl-ft needs neither Liger's fused linear cross-entropy (TRL turns it off) nor cut-cross-entropy
for a 152k vocabulary. TRL's tile is 32768 columns; the test narrows it so the tiny model's 1024 columns span
four tiles, and watches every tensor the forward and backward create."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qwenvl_ft.config.compose import compose, validate

from qwenvl_ft.data.shapes import make_rows


class _VocabularyWide(TorchDispatchMode):
    """Records the shape of every tensor an operator returns whose last dimension spans the whole vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.shapes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() > 1 and tensor.shape[-1] >= self.vocab:
                self.shapes.append((str(func), tuple(tensor.shape)))
        return out


def test_sft_loss_and_gradients_come_from_vocabulary_tiles_not_full_logits(tmp_path, monkeypatch):
    import trl.trainer.utils

    from qwenvl_ft.data.arrow import to_dataset
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.modeling.build import build_model, build_processor
    from qwenvl_ft.trainers.sft import build_trainer

    typed = validate(compose(["recipe=demo", "adapter=full", "trainer.report_to=[none]"], output_dir=str(tmp_path)))
    vocab = typed.model.architecture.vocab_size
    monkeypatch.setattr(trl.trainer.utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", vocab // 4)
    processor = build_processor(typed.model, typed.data)
    collator = VisionChatCollator(processor, typed.data)
    torch.manual_seed(0)
    model = build_model(typed.model, typed.adapter)
    rows = make_rows(3, 56, seed=0, split="train")
    trainer = build_trainer(typed, model, processor, collator, to_dataset(rows), None)
    batch = trainer._prepare_inputs(collator(rows))
    assert batch["input_ids"].shape[-1] < vocab  # no other tensor is as wide as the vocabulary

    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    with _VocabularyWide(vocab) as watched:
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert not watched.shapes, watched.shapes
    assert not head_calls  # the LM head module is never run: its weight is read tile by tile

    model.zero_grad()
    with _VocabularyWide(vocab) as reference_watch:  # the model's own loss: full logits, which the mode sees
        reference = model(**{k: v for k, v in batch.items()}, fused_lm_head=False).loss
        reference.backward()
    assert any(shape[-1] == vocab for _, shape in reference_watch.shapes)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
