"""Third-party progress bars stay out of logs that are not a terminal (qwenvl_ft/quiet.py)."""

import os
import subprocess
import sys

CODE = ("from qwenvl_ft.quiet import keep_progress_bars_to_terminals; keep_progress_bars_to_terminals(); "
        "from transformers.utils import logging; print(logging.is_progress_bar_enabled())")


def _bars_enabled(**env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120,
                         env={**environ, **env})  # stderr is a pipe: not a terminal
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_library_progress_bars_are_off_when_stderr_is_not_a_terminal():
    assert _bars_enabled() == "False"  # transformers' "Loading weights", "Writing model shards"


def test_the_users_own_setting_wins():
    assert _bars_enabled(HF_HUB_DISABLE_PROGRESS_BARS="0") == "True"
