#!/usr/bin/env bash
# What a GPU session runs to check and measure the work that has not run on a GPU yet, in stages that each fit
# one device call (10 minutes). Run on the device machine from a staged build (docs/gpu.md, "How it is run"):
#   source .gpu/prologue.sh && export TTT_CACHE_DIR=/tmp/tttc && cd gpu-stage && bash scripts/gpu-session.sh STAGE...
# Stages:
#   tests        npm run test:cuda as it is, then the suites that exercise the second-order kernels with them on
#                (TTT_CUDA_GRAD_KERNELS=1: norm, swiglu, softmax, cuda, model, golden)
#   train-ab     the 125m TTT-E2E training step (T 8K, bf16), one round of: as it is / second-order kernels on /
#                AdamW's one-launch kernel (TTT_ADAMW_KERNEL=fusedAll) / both (name the stage twice for two rounds)
#   train-inplace  the same step with both on, in-place accumulation of cotangents on and off (TTT_ACCUMULATE_IN_PLACE=0),
#                alternating, two rounds
#   train-plain  the 125m SWA step (T 8K, bf16), the output layer as one op with its gradients from the forward and as
#                checkpointed pieces (TTT_FUSED_OUTPUT_LOSS=0), alternating, two rounds
#   phases       where the 125m TTT-E2E step's GPU time goes by phase of the method (bench/phases.js: events at phase
#                boundaries, no synchronisation between), as it is and with the second-order kernels on
#   latency      the latency table (cuda-latency.js) at 8K, 32K and 128K for full attention and TTT-E2E
# Every command runs under `timeout -k 5 -s KILL` (a hung GPU process has ignored plain timeouts before). The device
# tool brings back at most 8 files from $OUT, so each stage appends to one log ($OUT/STAGE.log) and results go to
# $OUT/results.jsonl (one line per bench run: its label and JSON); the exit status and last lines go to stdout.
set -u
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"

run() { # run STAGE LABEL SECONDS COMMAND...: appended to $OUT/STAGE.log; exit status and last lines here
  local stage=$1 label=$2 limit=$3
  shift 3
  local t0=$SECONDS log="$out/$stage.log"
  echo "===== $label: $*" >>"$log"
  touch "$out/.started"
  timeout -k 5 -s KILL "$limit" "$@" >"$out/.last" 2>&1
  local rc=$?
  cat "$out/.last" >>"$log"
  echo "== $label: exit $rc after $((SECONDS - t0)) s"
  tail -6 "$out/.last"
  rm -f "$out/.last"
}

keep() { # keep LABEL FILE: the bench's JSON as one line of $OUT/results.jsonl, if the last run wrote it
  [ -f "$2" ] && [ "$2" -nt "$out/.started" ] && node -e 'const fs = require("fs"); fs.appendFileSync(process.argv[1], JSON.stringify({ label: process.argv[2], result: JSON.parse(fs.readFileSync(process.argv[3], "utf8")) }) + "\n")' "$out/results.jsonl" "$1" "$2"
}

round=0
for stage in "$@"; do
  case "$stage" in
    tests)
      run tests test-cuda 400 node scripts/test-cuda.mjs
      files=$(ls dist/test/{norm,swiglu,softmax,cuda,model,golden}.test.js 2>/dev/null)
      run tests test-cuda-grad-kernels 180 env TTT_DEVICE=cuda TTT_CUDA_GRAD_KERNELS=1 node --test --test-reporter=spec $files
      ;;
    train-ab)
      round=$((round + 1))
      for variant in plain grad adamw both; do
        case $variant in
          plain) envs=() ;;
          grad) envs=(TTT_CUDA_GRAD_KERNELS=1) ;;
          adamw) envs=(TTT_ADAMW_KERNEL=fusedAll) ;;
          both) envs=(TTT_CUDA_GRAD_KERNELS=1 TTT_ADAMW_KERNEL=fusedAll) ;;
        esac
        run train-ab "train-$variant-$round" 140 env "${envs[@]}" node dist/bench/cuda-train.js 8192 1 125m e2e bf16
        keep "train-$variant-$round" bench/results/cuda-train-125m.json
      done
      ;;
    train-inplace)
      for r in 1 2; do
        for variant in inplace separate; do
          envs=(TTT_CUDA_GRAD_KERNELS=1 TTT_ADAMW_KERNEL=fusedAll)
          [ $variant = separate ] && envs+=(TTT_ACCUMULATE_IN_PLACE=0)
          run train-inplace "train-$variant-$r" 140 env "${envs[@]}" node dist/bench/cuda-train.js 8192 1 125m e2e bf16
          keep "train-$variant-$r" bench/results/cuda-train-125m.json
        done
      done
      ;;
    train-plain)
      for r in 1 2; do
        for variant in fused pieces; do
          envs=()
          [ $variant = pieces ] && envs=(TTT_FUSED_OUTPUT_LOSS=0)
          run train-plain "swa-$variant-$r" 140 env "${envs[@]}" node dist/bench/cuda-train.js 8192 1 125m swa bf16
          keep "swa-$variant-$r" bench/results/cuda-train-125m.json
        done
      done
      ;;
    phases)
      run phases phases-plain 150 env TTT_DEVICE=cuda node dist/bench/phases.js e2e 8192 125m bf16 3
      keep phases-plain bench/results/phases-cuda-125m-e2e.json
      run phases phases-kernels 150 env TTT_DEVICE=cuda TTT_CUDA_GRAD_KERNELS=1 node dist/bench/phases.js e2e 8192 125m bf16 3
      keep phases-kernels bench/results/phases-cuda-125m-e2e.json
      ;;
    latency)
      run latency latency 500 node dist/bench/cuda-latency.js 8192,32768,131072 full,e2e
      keep latency bench/results/latency-cuda.json
      ;;
    *)
      echo "gpu-session: unknown stage '$stage' (tests, train-ab, train-inplace, train-plain, phases, latency)" >&2
      exit 2
      ;;
  esac
done
rm -f "$out/.started"
