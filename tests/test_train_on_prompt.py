"""data.train_on_prompt: the loss covers the whole sequence but the vision span (qwenvl_ft/data/collate.py).

The reference is the tutorial this option reproduces (philschmid's TRL fine-tuning of Qwen2-VL): the processor's
input ids as labels, with padding and <|vision_start|> / <|image_pad|> / <|vision_end|> masked.
"""

import pytest
import torch
from PIL import Image

from data_helpers import assistant, user, write_video
from qwenvl_ft.config.compose import compose
from qwenvl_ft.config.data import DataConfig
from qwenvl_ft.data.collate import IGNORE_INDEX, RowDropped, VisionChatCollator
from qwenvl_ft.data.packing import PackingCollator
from qwenvl_ft.errors import ConfigError


def _row(question, answer, colours=(), system=None, index=0):
    messages = [{"role": "user", "content": [{"type": "image", "text": None} for _ in colours]
                 + [{"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return {"messages": messages, "images": [Image.new("RGB", (56, 84), c) for c in colours],
            "source": f"test:{index}"}


ROWS = [_row("What is in the image?", "a red circle", ["red"]),
        _row("Two of them?", "a blue square and a green dot", ["blue", "green"], system="Be brief.", index=1),
        _row("No image here.", "fine", index=2)]


def _tutorial_labels(processor, rows):
    """The tutorial's collate_fn: processor over the rendered texts, labels = input ids, padding and the vision
    tokens masked."""
    texts = [processor.apply_chat_template(row["messages"], tokenize=False) for row in rows]
    images = [image for row in rows for image in row["images"]]
    batch = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    vision = processor.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    labels[torch.isin(labels, torch.tensor(vision))] = IGNORE_INDEX
    return batch, labels


def test_labels_equal_the_tutorials_whole_sequence_labels(tiny_processor):
    collator = VisionChatCollator(tiny_processor, DataConfig(max_length=None, train_on_prompt=True))
    ours = collator(ROWS)
    theirs, labels = _tutorial_labels(tiny_processor, ROWS)
    # the processor pads on the right as we do: same ids, same labels, position for position
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["labels"], labels)
    # and more is trained than with the default (answers only), the system and user turns included
    answers_only = VisionChatCollator(tiny_processor, DataConfig(max_length=None))(ROWS)
    trained, default = (ours["labels"] != IGNORE_INDEX).sum(), (answers_only["labels"] != IGNORE_INDEX).sum()
    assert trained > 3 * default
    assert ((answers_only["labels"] != IGNORE_INDEX) <= (ours["labels"] != IGNORE_INDEX)).all()


def test_packed_labels_are_the_samples_labels_with_each_first_token_masked(tiny_processor):
    collator = VisionChatCollator(tiny_processor, DataConfig(max_length=None, train_on_prompt=True))
    samples = [collator.encode(row) for row in ROWS]
    packed = PackingCollator(collator).pack(samples)
    expected = []
    for sample in samples:
        labels = sample["labels"].clone()
        assert labels[0] != IGNORE_INDEX  # a target on its own (unused: the model shifts labels by one) ...
        labels[0] = IGNORE_INDEX  # ... but never predicted from the previous sample's last token in a pack
        expected.append(labels)
    assert torch.equal(packed["labels"][0], torch.cat(expected))


def test_a_cut_that_leaves_no_answer_still_drops_the_row(tiny_processor):
    row = _row("A question long enough to fill the limit on its own, word after word after word.", "yes",
               ["red"])
    full = VisionChatCollator(tiny_processor, DataConfig(max_length=None, train_on_prompt=True)).encode(row)
    # the cut falls after the image but before the answer: prompt tokens are still targets, yet the row has no answer
    limit = int(full["input_ids"].numel()) - 4
    collator = VisionChatCollator(tiny_processor, DataConfig(max_length=limit, train_on_prompt=True))
    with pytest.raises(RowDropped, match="every assistant token"):
        collator.encode(row)
    kept = VisionChatCollator(tiny_processor, DataConfig(max_length=limit + 2, train_on_prompt=True)).encode(row)
    assert kept["input_ids"].numel() == limit + 2


def test_a_videos_timestamps_are_never_targets(processor_of, tmp_path):
    """Qwen3-VL expands a video into timestamped spans (text tokens between the vision markers): with the whole
    sequence trained, the timestamps stand for the video like its pads, and only the conversation's text is a
    target."""
    processor = processor_of("tiny_qwen3_vl")
    row = {"messages": [user("What?", videos=1), assistant("a red box")], "images": [],
           "videos": [str(write_video(tmp_path / "v.mp4"))], "source": "t:0"}
    sizes = dict(video_min_pixels=28 * 28, video_max_pixels=56 * 56)
    sample = VisionChatCollator(processor, DataConfig(train_on_prompt=True, **sizes)).encode(row)
    ids, labels = sample["input_ids"], sample["labels"]
    ids_of = processor.tokenizer.convert_tokens_to_ids
    starts, ends = (torch.nonzero(ids == ids_of(t)).flatten() for t in ("<|vision_start|>", "<|vision_end|>"))
    span = torch.zeros_like(ids, dtype=torch.bool)
    span[starts[0]: ends[-1] + 1] = True
    texts = span & (ids != ids_of("<|video_pad|>")) & (ids != ids_of("<|vision_start|>")) \
        & (ids != ids_of("<|vision_end|>"))
    assert texts.any(), "no timestamps in the video span: the family expands videos differently now"
    assert not (labels[span] != IGNORE_INDEX).any()
    targets = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
    assert targets == "<|im_start|>user\nWhat?<|im_end|>\n<|im_start|>assistant\na red box<|im_end|>\n"


@pytest.mark.parametrize("recipe, method", [("dpo_demo", "dpo"), ("grpo_demo", "grpo")])
def test_train_on_prompt_is_for_sft(recipe, method):
    with pytest.raises(ConfigError, match=f"data.train_on_prompt puts a token loss on the prompt too, for "
                                          f"trainer=sft; trainer={method}"):
        compose([f"recipe={recipe}", "data.train_on_prompt=true"], output_dir="/tmp/unused")
