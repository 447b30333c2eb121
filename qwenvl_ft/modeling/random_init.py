"""Randomly initialised models of any family with an in-process tokenizer: the tiny CPU models of the tests and
demo, and full-size architectures for GPU benchmarks, all without downloading anything.

The tokenizer is a byte-level BPE with Qwen2's pre-tokenizer (transformers' `Qwen2Tokenizer` built from a vocab
and merges learned here on a small fixed corpus), followed by Qwen's special tokens in their real order. Its ids
are compact (the real ones start at 151643) so that a tiny model does not pay for a 152k-row embedding; code must
therefore read token ids from the tokenizer, never hard-code them. The chat template, the model's config and the
processor are the family's (qwenvl_ft/families/<family>.py: `chat_template`, `random_config`, `random_processor`).

The model is written once to a cache folder (weights, config, processor) and then loaded with `from_pretrained`
like any checkpoint, so quantisation, PEFT and saving go through exactly the path a real model takes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from qwenvl_ft import families
from qwenvl_ft.families.base import load
from qwenvl_ft.config.model import ArchitectureConfig

# In the order of their real ids 151643..151656.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Text the BPE merges are learned from: chat scaffolding, the demo's vocabulary and plain English.
_CORPUS = """system user assistant You are a helpful assistant.
What is in the image? What shape is this? What colour is it? Describe the image. Answer with a short phrase.
a red circle, a green square, a blue triangle, a yellow circle, a purple square, an orange triangle, a cross.
red green blue yellow purple orange white black grey circle square triangle cross star ring left right top bottom
The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a table next to a cup of coffee.
Create a short product description based on the provided product name and category and image. Only return
the description. The description should be SEO optimized and for a better mobile search experience.
COCO Yes: a man riding a bike down a street. Two dogs playing in the grass. A plate of food with vegetables.
0 1 2 3 4 5 6 7 8 9 10 100 1000 yes no true false the of and to in is it that for on with as was at by an be this
"""


def build_tokenizer(num_merges: int = 600, chat_template: Optional[str] = None, family: str = families.DEFAULT):
    """A small byte-level BPE tokenizer of the family's tokenizer class (Qwen2Tokenizer, or a family's own, whose
    pre-tokenizer may differ), Qwen's special tokens, the family's added tokens (`<think>` ...) and
    `chat_template`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    declared = families.get(family)
    tokenizer_class = load(declared.tokenizer_class)
    # Learn merges with the same pre-tokenisation the tokenizer class applies, then hand vocab+merges to it.
    reference = tokenizer_class(vocab={"<|endoftext|>": 0}, merges=[])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + num_merges, initial_alphabet=alphabet,
                                  show_progress=False, min_frequency=1)
    bpe.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tokenizer = tokenizer_class(vocab=learned["vocab"], merges=merges, unk_token=None, eos_token=None,
                                pad_token=None)
    # Added in one go, in the real order, before naming eos/pad (naming them first would add them first).
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    if declared.added_tokens:
        tokenizer.add_tokens(list(declared.added_tokens))
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.chat_template = chat_template
    tokenizer.model_max_length = 32768
    return tokenizer


def build_processor(tokenizer, arch: ArchitectureConfig, family: str):
    """The family's processor around the in-process tokenizer, sized as `arch` says."""
    declared = families.get(family)
    return declared.random_processor(tokenizer, arch, declared.chat_template)


def model_config(arch: ArchitectureConfig, tokenizer, family: str):
    """The transformers config of a model of `family` with these sizes."""
    if arch.vocab_size < len(tokenizer):
        raise ValueError(f"model.architecture.vocab_size={arch.vocab_size} is smaller than the tokenizer "
                         f"({len(tokenizer)} tokens)")
    return families.get(family).random_config(arch, tokenizer)


# Bump when the tokenizer or the model construction changes, so that stale cached models are not reused.
_BUILDER_VERSION = 3


def cache_root() -> Path:
    """random_models/ in qwenvl-ft's cache folder (qwenvl_ft/cache_home.py)."""
    from qwenvl_ft.cache_home import cache_home

    return cache_home() / "random_models"


def _random_model(model_class, config, dtype, seed: int, device: str):
    """The model with random weights, initialised on `device`: on a GPU in seconds, where a random 7B did not get
    initialised and written within two minutes on a GPU machine's 16 CPU cores (most of a short benchmark lease)."""
    import torch

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        with torch.device(device):
            return model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)


def materialize(arch: ArchitectureConfig, dtype: str = "float32", family: str = families.DEFAULT) -> Path:
    """Folder holding the random model of `family` for `arch` (weights, config, processor); built once, then reused.

    The weights are created and stored in `dtype` (model.dtype): a random 7B in bfloat16 is 16.5 GB to initialise,
    write and read back instead of 33 GB in float32, which matters inside a GPU machine's short lease."""
    import torch
    from transformers import GenerationConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    recipe = {"arch": asdict(arch), "builder": _BUILDER_VERSION, "dtype": dtype, "family": family}
    if device != "cpu":  # random values differ by device; the CPU key stays what it was
        recipe["device"] = device
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / key
    if (target / "complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    declared = families.get(family)
    processor = build_processor(build_tokenizer(chat_template=declared.chat_template, family=family), arch, family)
    config = model_config(arch, processor.tokenizer, family)
    model = _random_model(declared.load_model_class(), config, getattr(torch, dtype), arch.init_seed, device)
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id, pad_token_id=config.text_config.pad_token_id,
        bos_token_id=config.text_config.bos_token_id, do_sample=False,
    )
    # Written next to the target and renamed into place: a concurrent or interrupted build never leaves a
    # half-written folder where a later run would load it.
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "complete").write_text(json.dumps(asdict(arch)))
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        del model
        if device != "cpu":
            torch.cuda.empty_cache()  # the run loads its own copy from the folder
    return target
