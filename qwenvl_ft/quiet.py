"""Library messages that tell a qwenvl-ft user nothing they can act on, filtered out of every command's output.

Each entry was seen on a plain `qwenvl-ft train recipe=demo` / `eval` / `merge` / `infer` run, and each is about a
library's internals rather than the user's run:

- bitsandbytes logs, on every import, that it could not load an optional CPU 4-bit kernel from the `kernels`
  package, even when nothing is quantised (its own slower path is used instead); offline, `kernels` (>= 0.19, a
  dependency of transformers) first logs that it skips that kernel repository's publisher check;
- DeepSpeed logs, when it is imported (by accelerate or peft), that it fell back to its CPU accelerator; on a GPU
  machine it says nothing, and DeepSpeed is not in use unless the config asks for it;
- rouge-score logs "Using default tokenizer." through absl at INFO on every score;
- transformers warns that `is_gradient_checkpointing` is deprecated, each time TRL reads it;
- MLflow logs at INFO that it creates and upgrades the tables of its default SQLite store, on every run that
  reports to it (where that store is, the trackers' own line says).

Progress bars go to a terminal only, as ours do (tqdm's `disable=None`): transformers' "Loading weights" and
"Writing model shards" and the Hub's downloads follow huggingface_hub's switch, which `keep_progress_bars_to_terminals`
turns off when stderr is not a terminal (a log file, CI), unless the user set HF_HUB_DISABLE_PROGRESS_BARS.

Filters match the message itself, so anything else these loggers say still shows. Messages that do concern the
user (a deprecated config value, a data problem, a fallback the user chose) are left alone on purpose.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# logger name (exactly: filters are not inherited) -> messages of it to drop (regular expressions, matched
# against the start of the message)
NOISY_LOG_MESSAGES = {
    "bitsandbytes.backends.cpu.ops": [r"Failed to load CPU gemm_4bit_forward from kernels-community"],
    "kernels._internals.hf_hub": [r"Skipping publisher trust check for 'kernels-community/"],
    "DeepSpeed": [r"Setting accelerator to CPU"],
    "mlflow.store.db.utils": [r"Creating initial MLflow database tables", r"Updating database tables"],
}
QUIET_LOGGERS = {"absl": logging.WARNING}  # rouge-score's "Using default tokenizer." on every score
NOISY_WARNINGS = [(FutureWarning, r"`is_gradient_checkpointing` is deprecated")]


class _DropMessages(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def silence_library_noise() -> None:
    """Install the filters (idempotent). Called before the libraries are imported: most of these fire on import."""
    for name, patterns in NOISY_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def keep_progress_bars_to_terminals() -> None:
    """Third-party progress bars off unless stderr is a terminal. Read by huggingface_hub (and through it
    transformers) when they are imported, so it is called before them."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
