"""Wall time of `qwenvl-ft train recipe=qlora_7b_amazon --cfg job` (compose + validate + print, no torch).

    python bench/cli_latency.py [--repeats 7] [--recipe qlora_7b_amazon]

Runs the installed console script in a fresh process each time (what a user waits for), after one untimed warm-up
run that fills the OS file cache and Python's bytecode cache. Prints a markdown table; target: under 1.5 s.
Also checks that torch was never imported on that path (`-X importtime`).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--recipe", default="qlora_7b_amazon")
    args = parser.parse_args()
    exe = shutil.which("qwenvl-ft") or str(Path(sys.executable).parent / "qwenvl-ft")
    command = [exe, "train", f"recipe={args.recipe}", "--cfg", "job"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run(command, check=True, capture_output=True, env=env)  # warm-up
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        done = subprocess.run(command, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - started)
    imports = subprocess.run([sys.executable, "-X", "importtime", exe, *command[1:]], capture_output=True, text=True,
                             env=env).stderr
    torch_imported = any(line.rstrip().endswith("| torch") for line in imports.splitlines())
    printed = done.stdout.decode().count("\n")
    load = os.getloadavg()[0]
    print(f"\n`{' '.join(['qwenvl-ft'] + command[1:])}`: {printed} lines of YAML, {args.repeats} runs after a "
          f"warm-up; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}; "
          f"Python {platform.python_version()}\n")
    print("| min s | median s | max s | torch imported | target |")
    print("|---:|---:|---:|---|---|")
    print(f"| {min(times):.2f} | {statistics.median(times):.2f} | {max(times):.2f} | "
          f"{'yes' if torch_imported else 'no'} | < 1.5 s: {'met' if statistics.median(times) < 1.5 else 'missed'} |")


if __name__ == "__main__":
    main()
