"""qwenvl-ft: declarative fine-tuning of Qwen2-VL / Qwen2.5-VL with Hydra configs and TRL trainers."""

__version__ = "0.1.0"
