#!/usr/bin/env bash
# The GPU plan of docs/performance.md as device calls that fit this workplace's 15-minute lease: each stage has
# its own time limit and writes its log under $OUT as it goes, so a stage that runs out of time or memory still
# leaves the rows it finished and the next stage runs. Stages (run one or several per call):
#   check   versions, nvidia-smi, the @gpu tests (tests/test_packing.py, tests/test_train_tiny.py)
#   sft2b   Qwen2-VL-2B, QLoRA and LoRA: qwenvl-ft padded vs packed vs stock TRL (bench/gpu_throughput.py)
#   qlora2b Qwen2-VL-2B QLoRA padded and packed;  lora2b: LoRA padded and packed (both: sft2b's parts)
#   dpo2b   Qwen2-VL-2B LoRA DPO: padded vs padding-free vs stock TRL;  dpo2b-ours: padded and padding-free only
#   sft7b   Qwen2-VL-7B, LoRA padded/packed/TRL and QLoRA padded/packed;  lora7b: LoRA padded/packed/TRL only
# Every stage's table ends with its memory against the estimate at the largest batch each run saw.
# Hardware: one CUDA GPU (measured on an H200). Launch, after `bash bench/gpu_wheels.sh` here, through the device
# tool with carry [".whl"]: bash bench/gpu_plan.sh check sft2b dpo2b      (then: bash bench/gpu_plan.sh sft7b)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_plan}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false QWENVL_FT_CACHE=${QWENVL_FT_CACHE:-/tmp/qwenvl_ft}
BENCH="python3 bench/gpu_throughput.py --warmup 2 --steps 6 --rows 160"

stage() {  # stage NAME SECONDS COMMAND...: the command's output in $OUT/NAME.log and on the screen
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -E '^\||^\{|^===|Error|error|passed|failed|skipped|^torch|^NVIDIA|GPU'
  echo "=== $name exit ${PIPESTATUS[0]} $(date +%T)"
}

for name in "$@"; do
  case $name in
    check) stage check 90 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
      python3 -c "import torch, transformers, trl, peft, bitsandbytes, datasets, hydra, pyarrow;
print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, \"trl\", trl.__version__,
      \"peft\", peft.__version__, \"bitsandbytes\", bitsandbytes.__version__, \"datasets\", datasets.__version__,
      \"pyarrow\", pyarrow.__version__, torch.cuda.get_device_name())";
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_packing.py tests/test_train_tiny.py -rs' ;;
    sft2b) stage sft2b 180 $BENCH --models qwen2_vl_2b --methods qlora lora ;;
    dpo2b) stage dpo2b 100 $BENCH --dpo --models qwen2_vl_2b --methods lora ;;
    qlora2b) stage qlora2b 130 $BENCH --models qwen2_vl_2b --methods qlora --layouts padded packed ;;
    lora2b) stage lora2b 90 $BENCH --models qwen2_vl_2b --methods lora --layouts padded packed ;;
    dpo2b-ours) stage dpo2b-ours 110 $BENCH --dpo --models qwen2_vl_2b --methods lora --layouts padded padding-free ;;
    lora7b) stage lora7b 220 $BENCH --models qwen2_vl_7b --methods lora ;;
    sft7b) stage sft7b 330 bash -c "$BENCH --models qwen2_vl_7b --methods lora; $BENCH --models qwen2_vl_7b --methods qlora --layouts padded packed" ;;
    *) echo "unknown stage $name (check, sft2b, qlora2b, lora2b, dpo2b, dpo2b-ours, sft7b, lora7b)"; exit 2 ;;
  esac
done
