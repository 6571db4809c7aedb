#!/usr/bin/env bash
# The GPU machine's suite, in one call (device time is scarce): GPU tests, a GPU training run of
# the built-in task, then `longtune bench train` beside the PyTorch anchor on the same GPU.
#   tests/bench/gpu_suite.sh DIR [tests|eval|train|resume|bench|nondet|attn|kernels|mpi|comm|scaling|offload|plan|resume-offload|activations|lean8b|recipes4 ...]
# DIR holds bin/ and lib/ as env/pack-device.sh gathers them (plus anchor_torch.py / anchor_attn.py
# for the bench parts). Logs go to $OUT (or /tmp/gpu_suite). BENCH_ARGS: extra `bench train` options
# of the bench and bench1b parts (the issue-5 table: BENCH_ARGS="--attention cudnn").
set -uo pipefail
dir="$1"; shift
out="${OUT:-/tmp/gpu_suite}"; mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/$dir/lib:${LD_LIBRARY_PATH:-}" LONGTUNE_FIXTURE_DIR="$PWD/tests/fixtures"
export OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"

# resume_check LABEL TRAIN-OPTIONS...: 40 steps straight vs 20 + stop + resume on the built-in task;
# the exported weights must be byte-identical.
resume_check() {
  local label="$1"; shift
  local a="/tmp/rc-${label// /_}-a" b="/tmp/rc-${label// /_}-b" r
  rm -rf "$a" "$b"
  local common="--device cuda --steps 40 --eval-every -1 --log-every 20 $*"
  "$dir/bin/longtune" train $common --run-dir "$a" > "$a.log" 2>&1
  "$dir/bin/longtune" train $common --run-dir "$b" --stop-after 20 > "$b.log" 2>&1
  "$dir/bin/longtune" train $common --run-dir "$b" >> "$b.log" 2>&1
  "$dir/bin/longtune" export --run-dir "$a" --out "$a/hf" --dtype fp32 > /dev/null
  "$dir/bin/longtune" export --run-dir "$b" --out "$b/hf" --dtype fp32 > /dev/null
  if cmp -s "$a/hf/model.safetensors" "$b/hf/model.safetensors"; then r=IDENTICAL; else r=DIFFERENT; fi
  echo "resume $label: 40 steps straight vs 20 + stop + resume: $r" | tee -a "$out/resume.log"
  tail -3 "$a.log" >> "$out/resume.log"
}
for part in "$@"; do
  case "$part" in
    tests)
      "$dir/bin/longtune_tests" --gtest_filter='Cuda*:Gpu*' 2>&1 | tee "$out/gpu_tests.log" | grep -E "^\[  (FAILED|PASSED) |OK \]|FAILED|gpu-model|gpu-train" ;;
    train)
      rm -rf /tmp/lt-gpu-run
      "$dir/bin/longtune" train --device cuda --run-dir /tmp/lt-gpu-run 2>&1 | tee "$out/train_builtin.log" | tail -8 ;;
    bench)
      for c in "1b 16384" "1b 32768" "3b 8192"; do
        set -- $c
        "$dir/bin/longtune" bench train --model "$1" --seq-len "$2" ${BENCH_ARGS:-} 2>&1 | tee -a "$out/bench_longtune.log" | grep -E "RESULT|error|plan"
        python3 "$dir/anchor_torch.py" train "$1" "$2" gpu 2>&1 | tee -a "$out/bench_anchor.log" | grep -E "RESULT|Error"
      done ;;
    eval)
      "$dir/bin/longtune" eval --device cuda --model-dir tests/fixtures/golden/gqa_hd64_gpu --data tests/fixtures/tiny_dataset.h5 \
        --seq-len 32 2>&1 | tee "$out/eval_gpu.log" | tail -2
      "$dir/bin/longtune" eval --model-dir tests/fixtures/golden/gqa_hd64_gpu --data tests/fixtures/tiny_dataset.h5 \
        --seq-len 32 2>&1 | tee -a "$out/eval_gpu.log" | tail -1 ;;
    nondet)
      "$dir/bin/longtune" bench train --model 1b --seq-len 16384 --nondeterministic-attention 2>&1 | tee -a "$out/bench_longtune.log" | grep -E "RESULT \{" ;;
    resume)
      for variant in "bf16 auto" "fp16 auto" "fp16 sm75"; do
        set -- $variant
        resume_check "$1 attention=$2" --dtype "$1" --attention "$2"
      done ;;
    bench1b)
      "$dir/bin/longtune" bench train --model 1b --seq-len 16384 ${BENCH_ARGS:-} 2>&1 | tee -a "$out/bench_longtune.log" | grep -E "RESULT|error|plan|step" ;;
    kernels)
      "$dir/bin/longtune_tests" --gtest_also_run_disabled_tests --gtest_filter='*CudaKernelBench*:*CudaMatmulBench*' \
        2>&1 | tee "$out/kernel_bench.log" | grep -vE "^\[ (RUN|      OK) " | tail -40 ;;
    mpi)
      # Multi-GPU tests (NCCL): one rank per GPU.
      n=$(nvidia-smi -L | wc -l)
      mpirun --allow-run-as-root -np "$n" -x LD_LIBRARY_PATH -x LONGTUNE_FIXTURE_DIR -x OMP_NUM_THREADS \
        "$dir/bin/longtune_mpi_tests" --gtest_filter='DeviceCommMpi.*:ZeroEngineMpi.*' 2>&1 | tee "$out/mpi_tests.log" \
        | grep -E "^\[  (FAILED|PASSED|SKIPPED) |OK \]|FAILED|zero-mpi" ;;
    comm)
      n=$(nvidia-smi -L | wc -l)
      mpirun --allow-run-as-root -np "$n" -x LD_LIBRARY_PATH "$dir/bin/longtune" bench comm 2>&1 | tee "$out/bench_comm.log" | tail -30 ;;
    scaling)
      # Weak scaling, 3B shape at 16K tokens per GPU, optimizer and weights on the GPUs, 1 -> 2 -> 4 ranks,
      # the gradient reduce-scatter in fp32 and, from 2 ranks on, in bf16 beside it.
      n=$(nvidia-smi -L | wc -l)
      for c in ${SCALING_ROWS:-1:fp32 2:fp32 2:bf16 4:fp32 4:bf16}; do  # ranks:gradient wire dtype
        set -- ${c/:/ }
        [ "$1" -le "$n" ] || continue
        mpirun --allow-run-as-root -np "$1" -x LD_LIBRARY_PATH -x OMP_NUM_THREADS --bind-to none "$dir/bin/longtune" bench train \
          --model 3b --seq-len 16384 --offload none --weights "${SCALING_WEIGHTS:-resident}" --recompute "${SCALING_RECOMPUTE:-auto}" --steps 6 --warmup 2 \
          --grad-reduce-dtype "$2" 2>&1 | tee -a "$out/scaling.log" | grep -E "RESULT \{|error|plan"
      done ;;
    offload)
      # 3B at 16K: optimizer on the host (ours) beside FSDP2 CPU offload (the anchor), and ours all on the GPU.
      for extra in "" "--delayed-update"; do
        OMP_NUM_THREADS=16 "$dir/bin/longtune" bench train --model 3b --seq-len 16384 --offload optimizer $extra --steps 6 --warmup 2 2>&1 \
          | tee -a "$out/bench_offload.log" | grep -E "RESULT \{|error"
      done
      "$dir/bin/longtune" bench train --model 3b --seq-len 16384 --steps 5 --warmup 2 2>&1 | tee -a "$out/bench_offload.log" | grep -E "RESULT \{|error"
      python3 "$dir/anchor_torch.py" train 3b 16384 offload 2>&1 | tee -a "$out/bench_offload_anchor.log" | grep -E "RESULT|Error" ;;
    plan)
      # Planner predictions beside measured peaks (--gpu-mem-limit emulates the smaller GPU).
      for c in "1b 16384 optimizer resident layer 24GiB" "3b 16384 optimizer resident layer 48GiB" \
               "3b 32768 params streamed layer 16GiB" "1b 32768 none resident none 80GiB"; do
        set -- $c
        OMP_NUM_THREADS=16 "$dir/bin/longtune" bench train --model "$1" --seq-len "$2" --offload "$3" --weights "$4" \
          --recompute "$5" --gpu-mem-limit "$6" --steps 3 --warmup 1 2>&1 | tee -a "$out/plan_vs_measured.log" | grep -E "RESULT|error"
      done ;;
    activations)
      # Layer inputs on the host + MLP tiles (docs/offload.md, "Long sequences"): results equal, planned
      # beside measured device and host memory, and the step time they cost (with and without, same GPU).
      "$dir/bin/longtune_tests" --gtest_filter='GpuZeroEngine.ActivationOffload*:GpuModel.Offload*:GpuPlan.*' 2>&1 \
        | tee "$out/activations_tests.log" | grep -E "^\[  (FAILED|PASSED) |OK \]|FAILED|zero-engine|gpu-offload"
      for extra in "" "--offload-activations --mlp-chunk 4096"; do
        "$dir/bin/longtune" bench train --model 1b --seq-len 65536 --recompute layer $extra --steps 4 --warmup 1 2>&1 \
          | tee -a "$out/activations.log" | grep -E "RESULT \{|error|plan"
        OMP_NUM_THREADS=16 "$dir/bin/longtune" bench train --model 3b --seq-len 65536 --offload optimizer --recompute layer \
          $extra --steps 3 --warmup 1 2>&1 | tee -a "$out/activations.log" | grep -E "RESULT \{|error|plan"
      done
      # The plan's pick for 3B at 64K on a 24 GiB GPU; without the options it is refused at start.
      OMP_NUM_THREADS=16 "$dir/bin/longtune" bench train --model 3b --seq-len 65536 --offload optimizer --recompute layer \
        --offload-activations --mlp-chunk 4096 --gpu-mem-limit 24GiB --steps 3 --warmup 1 2>&1 \
        | tee -a "$out/activations.log" | grep -E "RESULT|error|plan"
      OMP_NUM_THREADS=16 "$dir/bin/longtune" bench train --model 3b --seq-len 65536 --offload optimizer --recompute layer \
        --gpu-mem-limit 24GiB --steps 3 --warmup 1 2>&1 | tee -a "$out/activations.log" | grep -E "RESULT \{|error"
      # auto keeps everything when it fits, and then drops the offload (RESULT: recompute none, offload_activations false).
      "$dir/bin/longtune" bench train --model 1b --seq-len 4096 --offload-activations --mlp-chunk 1024 --steps 3 --warmup 1 \
        2>&1 | tee -a "$out/activations.log" | grep -E "RESULT \{|error"
      # train through both engines on the built-in task (1024 tokens per micro-batch: four tiles).
      for off in none optimizer; do
        rm -rf /tmp/lt-act-$off
        "$dir/bin/longtune" train --device cuda --offload $off --recompute layer --offload-activations true --mlp-chunk 256 \
          --steps 30 --eval-every -1 --log-every 10 --run-dir /tmp/lt-act-$off 2>&1 | tee -a "$out/activations_train.log" \
          | grep -E "GPU|step +30/|done|error" | cut -c1-400
      done ;;
    resume-offload)
      # Offloaded optimizer, also with the lean host state (bf16 host gradients, weights from the master).
      for off in optimizer params; do
        resume_check "--offload $off" --offload $off
        resume_check "--offload $off lean host" --offload $off --host-grad-dtype bf16 --host-weights master
      done ;;
    lean8b)
      # Llama-3.1-8B on one GPU (issue 6): the plan, then tokens/s at 32K under a 48 GiB cap (exact and
      # delayed update) and the 64K goal, with the lean host state (the machine has 128 GiB of host
      # memory; 16 B/param of fp32 state would not fit). LEAN8B_RUNS picks the runs (default: all).
      host="$(awk '/MemTotal/{print int($2/1048576)}' /proc/meminfo)GiB"
      for cap in 48GiB 16GiB; do
        "$dir/bin/longtune" plan --model 8b --gpu-mem $cap --host-mem "$host" --seq-len 32768 > "$out/plan_8b_$cap.log" 2>&1
        tail -4 "$out/plan_8b_$cap.log"
      done
      # The plan's longest sequence of a placement (the last column of its row).
      longest() { grep -F "$2" "$out/plan_8b_$1.log" | grep -v '^\[' | awk 'length($0) > 0 {print $NF}' | tail -1; }
      l48=$(longest 48GiB "offload optimizer + params, recompute per layer, MLP tiles, lean host")
      l16=$(longest 16GiB "offload optimizer + params, recompute per layer, activations to host, lean host")
      echo "plan: longest 8B sequence at 48 GiB $l48, at 16 GiB $l16 (host $host)" | tee -a "$out/lean8b.log"
      lean="--host-grad-dtype bf16 --host-weights master"
      for run in ${LEAN8B_RUNS:-32k 32k-dpu 64k longest48 longest16}; do
        case $run in
          32k) args="--seq-len 32768 --offload optimizer --recompute layer $lean --gpu-mem-limit 48GiB --steps 4 --warmup 1" ;;
          32k-dpu) args="--seq-len 32768 --offload optimizer --recompute layer $lean --delayed-update --gpu-mem-limit 48GiB --steps 4 --warmup 1" ;;
          64k) args="--seq-len 65536 --offload optimizer --recompute layer --mlp-chunk 4096 $lean --gpu-mem-limit 48GiB --steps 3 --warmup 1" ;;
          longest48) args="--seq-len ${LONGEST48:-$l48} --offload params --recompute layer --mlp-chunk 4096 $lean --gpu-mem-limit 48GiB --steps 2 --warmup 1" ;;
          longest16) args="--seq-len ${LONGEST16:-$l16} --offload params --recompute layer --offload-activations --mlp-chunk 4096 $lean --gpu-mem-limit 16GiB --steps 2 --warmup 1" ;;
        esac
        echo "== 8b $run: $args" | tee -a "$out/lean8b.log"
        OMP_NUM_THREADS=16 "$dir/bin/longtune" bench train --model 8b $args 2>&1 | tee -a "$out/lean8b.log" | grep -E "RESULT|rror|plan|step"
      done ;;
    recipes4)
      # Issue 8 on the lent 4-GPU kind: the v100x8 recipe's step (fp16, sm75 attention, params offload,
      # 16 GiB cap) and the a6000x4 recipe's (bf16, 48 GiB cap), 8B, 4 ranks, with the plan beside.
      n=$(nvidia-smi -L | wc -l)
      host="$(awk '/MemTotal/{print int($2/1048576)}' /proc/meminfo)GiB"
      "$dir/bin/longtune" plan --model 8b --gpus "$n" --gpu-mem 16GiB --host-mem "$host" --dtype fp16 --seq-len "${V100_SEQ:-43008}" 2>&1 | tee -a "$out/plan_recipes.log" | tail -4
      "$dir/bin/longtune" plan --model 8b --gpus "$n" --gpu-mem 48GiB --host-mem "$host" --seq-len "${A6000_SEQ:-65536}" 2>&1 | tee -a "$out/plan_recipes.log" | tail -4
      mpirun --allow-run-as-root -np "$n" -x LD_LIBRARY_PATH -x OMP_NUM_THREADS=8 --bind-to none "$dir/bin/longtune" bench train \
        --model 8b --dtype fp16 --attention sm75 --offload params --recompute layer --offload-activations --mlp-chunk 4096 \
        --gpu-mem-limit 16GiB --seq-len "${V100_SEQ:-43008}" --steps "${RECIPE_STEPS:-3}" --warmup 1 2>&1 | tee -a "$out/recipes4.log" | grep -E "RESULT|rror|plan|step"
      mpirun --allow-run-as-root -np "$n" -x LD_LIBRARY_PATH -x OMP_NUM_THREADS=8 --bind-to none "$dir/bin/longtune" bench train \
        --model 8b --offload optimizer --recompute layer --mlp-chunk 4096 --gpu-mem-limit 48GiB \
        --seq-len "${A6000_SEQ:-65536}" --steps "${RECIPE_STEPS:-3}" --warmup 1 2>&1 | tee -a "$out/recipes4.log" | grep -E "RESULT|rror|plan|step" ;;
    attn)
      ATTN_BENCH_QUICK=1 "$dir/bin/longtune_tests" --gtest_also_run_disabled_tests --gtest_filter='*CudaAttentionBench*' 2>&1 | tee "$out/attn_bench.log" | tail -12
      python3 "$dir/anchor_attn.py" 2>&1 | tee "$out/attn_anchor.log" | tail -8 ;;
  esac
done
