"""qwenvl-ft: declarative fine-tuning of Qwen vision-language models (one declaration per model family,
qwenvl_ft/families) with Hydra configs and TRL trainers."""

__version__ = "0.1.0"
