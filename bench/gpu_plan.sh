#!/usr/bin/env bash
# The GPU plan of docs/performance.md ("The GPU plan") as two device calls that fit one 15-minute lease: each call
# about 8 minutes with the machine's start, i.e. about 5.5 minutes of stages. Every stage has its own time limit
# and writes its log under $OUT as it goes, so a stage that runs out of time or memory still leaves the rows it
# finished and the next stage runs. Stages, most important first within each call:
#   lease1 = check dist lora2b levers2b        lease2 = qlora2b liger lora7b qlora7b
#   check     versions, nvidia-smi, every @gpu test of tests/ (Liger against eager, varlen, ...)
#   dist      one-GPU smoke of dist=zero3 and dist=fsdp with dist.num_processes=1 (NCCL, DeepSpeed, FSDP paths)
#   lora2b    Qwen2-VL-2B LoRA: padded, packed, stock TRL (the baseline every lever is measured against)
#   levers2b  2B LoRA with one lever each: model.varlen_attention=torch, model.use_liger_kernel=true (Liger's
#             modules swapped in by qwenvl-ft), model.compile=true (packed), model.gradient_checkpointing=auto
#             (packed), trainer.batch_size=auto (padded), then all of them but Liger
#   qlora2b   2B QLoRA padded, packed, stock TRL with adapter.qlora_fp32_upcast=true (today's
#             prepare_model_for_kbit_training), then packed with false (lean)
#   liger     model.use_liger_kernel through Liger's own patch (the Trainer's path: Qwen3.5-0.8B), LoRA
#             packed, without and with (Qwen2-VL's Liger modules: levers2b, against lora2b's packed row)
#   lora7b    Qwen2-VL-7B LoRA: padded, packed, stock TRL, then packed with every lever
#   qlora7b   7B QLoRA (qlora_7b_amazon's adapter): stock TRL and packed as today, then lean + every lever
#   dpo2b     (not in a lease) 2B LoRA DPO: padded vs padding-free vs stock TRL;  dpo2b-ours: without TRL
# Every bench table ends with each run's peak memory against `qwenvl-ft estimate` at the largest batch it saw.
# Hardware: one CUDA GPU (H100 or H200). Launch, after `bash bench/gpu_wheels.sh` here, through the device tool
# with carry [".whl"] and timeout_s 480: `bash bench/gpu_plan.sh lease1`, then `bash bench/gpu_plan.sh lease2`.
# Without a GPU: `DRY=1 bash bench/gpu_plan.sh lease1 lease2` composes and checks every run's config and prints
# it with its estimate (no training, no tests), the CPU check of this plan.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_plan}
DRY=${DRY:-}
mkdir -p "$OUT"
if [ -d .whl ] && [ -z "$DRY" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false QWENVL_FT_CACHE=${QWENVL_FT_CACHE:-/tmp/qwenvl_ft}
PY=${PYTHON:-python3}
BENCH="$PY bench/gpu_throughput.py --warmup 2 --steps 4 --rows 96 ${DRY:+--dry-run}"
VARLEN="model.varlen_attention=torch"
COMPILE="model.compile=true"
GC_AUTO="model.gradient_checkpointing=auto"
BS_AUTO="trainer.batch_size=auto"
LEAN="adapter.qlora_fp32_upcast=false"
LIGER="model.use_liger_kernel=true"
UPCAST="adapter.qlora_fp32_upcast=true"

stage() {  # stage NAME SECONDS COMMAND...: the command's output in $OUT/NAME.log and on the screen
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" \
    | grep -E '^\||^\{|^\[|^===|^variant|Error|error|passed|failed|skipped|^torch|^NVIDIA|GPU|smoke'
  echo "=== $name exit ${PIPESTATUS[0]} $(date +%T)"
}

check() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, trl, peft, bitsandbytes, importlib.metadata as m
print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft',
      peft.__version__, 'bitsandbytes', bitsandbytes.__version__, torch.cuda.get_device_name())
for name in ('liger-kernel', 'triton', 'deepspeed', 'flash-attn'):
    try: print(name, m.version(name))
    except m.PackageNotFoundError: print(name, 'not installed')"
  $PY -m pytest -q -p no:cacheprovider -m gpu -rs --continue-on-collection-errors tests/
}

dist_smoke() {  # the tiny model, 3 steps, one process through the launcher, per engine; peak memory per rank
  for option in zero3 fsdp; do
    if [ -n "$DRY" ]; then
      $PY -m qwenvl_ft train recipe=demo dist=$option dist.num_processes=1 trainer.max_steps=3 --cfg job >/dev/null \
        && echo "smoke dist=$option: config ok" || echo "smoke dist=$option: config error"
      continue
    fi
    $PY -m qwenvl_ft train recipe=demo dist=$option dist.num_processes=1 trainer.max_steps=3 \
      trainer.eval_generation=false trainer.report_to=[none] "hydra.run.dir=$OUT/dist_$option" \
      && echo "smoke dist=$option: ok" || echo "smoke dist=$option: failed (exit $?)"
  done
}

export -f check dist_smoke
export PY DRY OUT

for name in "$@"; do
  case $name in
    lease1) bash "$0" check dist lora2b levers2b ;;
    lease2) bash "$0" qlora2b liger lora7b qlora7b ;;
    check) if [ -z "$DRY" ]; then stage check 80 bash -c check; else bash -n "$0" && echo "check: bash -n ok"
             $PY -m pytest -q -p no:cacheprovider -m gpu --collect-only tests/ | grep -E "::|selected"; fi ;;
    dist) stage dist 60 bash -c dist_smoke ;;
    lora2b) stage lora2b 70 $BENCH --models qwen2_vl_2b --methods lora --label baseline ;;
    levers2b) stage levers2b 135 bash -c "
      $BENCH --models qwen2_vl_2b --methods lora --layouts packed --set $VARLEN --label varlen;
      $BENCH --models qwen2_vl_2b --methods lora --layouts packed --set $LIGER --label liger;
      $BENCH --models qwen2_vl_2b --methods lora --layouts packed --set $COMPILE --label compile;
      $BENCH --models qwen2_vl_2b --methods lora --layouts packed --set $GC_AUTO --label gc-auto;
      $BENCH --models qwen2_vl_2b --methods lora --layouts padded --set $BS_AUTO --label batch-auto;
      $BENCH --models qwen2_vl_2b --methods lora --layouts packed --set $VARLEN $COMPILE $GC_AUTO --label all" ;;
    qlora2b) stage qlora2b 85 bash -c "
      $BENCH --models qwen2_vl_2b --methods qlora --set $UPCAST --label fp32-upcast;
      $BENCH --models qwen2_vl_2b --methods qlora --layouts packed --set $LEAN --label lean" ;;
    liger) stage liger 45 bash -c "
      $BENCH --models qwen3_5_0_8b --methods lora --layouts packed --label baseline;
      $BENCH --models qwen3_5_0_8b --methods lora --layouts packed --set $LIGER --label liger" ;;
    lora7b) stage lora7b 130 bash -c "
      $BENCH --models qwen2_vl_7b --methods lora --label baseline;
      $BENCH --models qwen2_vl_7b --methods lora --layouts packed --set $VARLEN $COMPILE $GC_AUTO --label all" ;;
    qlora7b) stage qlora7b 90 bash -c "
      $BENCH --models qwen2_vl_7b --methods qlora --layouts trl packed --set $UPCAST --label fp32-upcast;
      $BENCH --models qwen2_vl_7b --methods qlora --layouts packed --set $LEAN $VARLEN $COMPILE $GC_AUTO --label all" ;;
    dpo2b) stage dpo2b 100 $BENCH --dpo --models qwen2_vl_2b --methods lora ;;
    dpo2b-ours) stage dpo2b-ours 110 $BENCH --dpo --models qwen2_vl_2b --methods lora --layouts padded padding-free ;;
    *) echo "unknown stage $name (lease1, lease2, check, dist, lora2b, levers2b, qlora2b, liger, lora7b, qlora7b," \
            "dpo2b, dpo2b-ours)"
       exit 2 ;;
  esac
done
