#!/usr/bin/env bash
# Wheels for the lent GPU machine (the `device` tool): it has python3 3.12 with torch, torchvision, accelerate,
# huggingface_hub, tokenizers, tensorboard and pandas/pyarrow, but no network, and lacks what qwenvl-ft adds
# on top. This downloads those (the versions CI installs) into .whl/ (git-ignored): about 61 MB, under the
# 64 MiB a device call may carry. Left out on purpose: av (35 MB; videos only), rouge-score (eval only),
# huggingface_hub / tokenizers (the machine's own satisfy transformers' pins).
# Hardware: any machine with pip and internet. Launch: bash bench/gpu_wheels.sh
# Then, on the device (carry: [".whl"]), begin the command with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  transformers==5.24.0 trl==1.16.0 peft==0.21.2 bitsandbytes==0.50.2 hydra-core==1.3.8 omegaconf==2.3.1 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 qwen-vl-utils==0.0.14 liger-kernel==0.8.5
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # hydra's parser; published as sdist only
# DeepSpeed for gpu_plan.sh's dist=zero3 smoke (2.2 MB): published as sdist only, and its setup imports torch, so
# it is built against this machine's torch (ops are compiled on first use, not here)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
# and its small dependencies (0.8 MB); pydantic (2.8 MB with its core) is left to the machine, for room: without
# it the zero3 smoke says so and the fsdp smoke still runs
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0
du -sh .whl
