#!/usr/bin/env bash
# whet's GPU checks, from the folder `cargo xtask gpu-bundle` writes (target/gpu-bundle/), on a
# machine with one H100/H200, PyTorch 2.11 with its CUDA 13 wheels and transformers; no network,
# no cargo. In under 8 minutes, each step with its own timeout and all within one deadline:
#
#   1. unpack bin/whet, bin/hf_parity and bin/cuda_kernels (xz, through Python's lzma);
#   2. LD_LIBRARY_PATH from PyTorch's wheels only (site-packages/nvidia/*/lib: cu13, nccl, ...);
#      the binaries carry no CUDA libraries and the driver's libcuda comes from the system;
#   K. first, whet's opt-in CUDA kernels (WHET_CUDA_KERNELS=1) against their composed candle
#      forms (engine/tests/cuda_kernels.rs: random inputs, a fresh seed printed, NaN-poisoned
#      outputs, forward and backward, f32 and bf16), one table row per kernel;
#   3. the transformers parity tests (engine/tests/hf_parity.rs, the same test binary CI runs)
#      on the GPU in fp32 (the fixture README's float32 tolerances) and in bf16 (the test's bf16
#      tolerances);
#   4. the demo (examples/demo.yaml) trained on the GPU, its last eval_exact_match >= 0.9;
#   5. one NCCL rank end to end: torchrun --nproc_per_node=1 --no_python whet sft --deepspeed zero2;
#   6. `whet bench train` (composed ops, then WHET_CUDA_KERNELS=1) beside torch_train_bench.py
#      (eager, then --compile), all --device cuda --dtype bfloat16, on the same presets, batches
#      and sequence lengths: tokens/s, MFU (6 x active params x tokens / s / 989 TFLOP/s), peak
#      memory;
#   7. a markdown table of every check, last.
#
# A failing step is reported in the table and the rest still run; the exit status is 1 if any
# failed. Logs and outputs go to $WHET_GPU_OUT (default ./out).
#
#   ./run.sh                    # PYTHON=python3; set PYTHON to the interpreter that has torch
#   WHET_GPU_STEPS="kernels bench" ./run.sh   # only these groups (kernels parity demo nccl bench)
set -euo pipefail

cd "$(dirname "$0")"
export BUNDLE=$PWD
export PYTHON=${PYTHON:-python3}
export OUT=${WHET_GPU_OUT:-$BUNDLE/out}
export WHET=$BUNDLE/bin/whet
export CUDA_VISIBLE_DEVICES=0
export HF_HUB_OFFLINE=1
# The whole run's deadline (8 minutes, less a margin for the table).
START=$(date +%s)
DEADLINE=$((START + ${WHET_GPU_BUDGET_S:-465}))

# The bench: preset, sequences per step, tokens per sequence, steps (the first 2 untimed); the
# issue's two shapes first, so a short budget cuts the small one.
BENCHES=(
  "qwen3-0.6b 4 2048 5"
  "qwen3-30b-a3b-4l 2 2048 4"
  "small 8 512 8"
)

rm -rf "$OUT"
mkdir -p "$OUT/logs"
ROWS=()
FAILED=0
STEPS=${WHET_GPU_STEPS:-kernels parity demo nccl bench}

# wanted GROUP: whether this run includes the step group.
wanted() {
  [[ " $STEPS " == *" $1 "* ]]
}

# row CHECK RESULT FIGURES: one line of the final table.
row() {
  ROWS+=("| $1 | $2 | $3 |")
  [[ $2 == pass ]] || FAILED=1
  echo "== $1: $2${3:+ — $3}"
}

# step NAME LIMIT_S COMMAND: runs COMMAND (exported functions, in its own bash with -euo
# pipefail) under the smaller of its limit and what is left of the deadline. Its last stdout line
# is the table's figures; its stderr, and what it writes to $STEP_LOG, is the step's log.
step() {
  local name=$1 limit=$2 command=$3 left rc=0 began
  left=$((DEADLINE - $(date +%s)))
  ((limit < left)) || limit=$left
  if ((limit < 10)); then
    row "$name" "skipped" "out of time (the run's ${WHET_GPU_BUDGET_S:-465} s budget is spent)"
    return
  fi
  export STEP_LOG=$OUT/logs/${name//[^A-Za-z0-9.-]/_}.log
  echo "-- $name (up to ${limit} s; log ${STEP_LOG#"$BUNDLE"/})"
  began=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "set -euo pipefail; $command" \
    >"$STEP_LOG.figures" 2>>"$STEP_LOG" || rc=$?
  local secs=$(($(date +%s) - began)) figures log=${STEP_LOG#"$BUNDLE"/}
  figures=$(tail -n 1 "$STEP_LOG.figures")
  case $rc in
    0) row "$name" pass "$figures (${secs} s)" ;;
    124 | 137) row "$name" "FAIL: timed out after ${limit} s" "${figures:+$figures; }log: $log" ;;
    *) row "$name" "FAIL (exit $rc)" "${figures:+$figures; }log: $log: $(grep -v '^\s*$' "$STEP_LOG" | tail -n 1 | cut -c1-200)" ;;
  esac
}

# ---- 1. the binaries
for name in whet hf_parity cuda_kernels; do
  if [[ ! -x bin/$name ]]; then
    "$PYTHON" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' "bin/$name.xz" "bin/$name"
    chmod +x "bin/$name"
  fi
done

# ---- 2. the CUDA libraries of PyTorch's wheels, and nothing else
LD_LIBRARY_PATH=$("$PYTHON" - <<'EOF'
import glob, os, sys
dirs = []
for entry in sys.path:  # site-packages (and any PYTHONPATH) of the interpreter with torch
    for lib in sorted(glob.glob(os.path.join(entry or ".", "nvidia", "*", "lib"))):
        lib = os.path.realpath(lib)
        if lib not in dirs:
            dirs.append(lib)
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
missing=$( (ldd bin/whet bin/hf_parity bin/cuda_kernels 2>/dev/null || true) | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')
if [[ -z $LD_LIBRARY_PATH ]]; then
  row "CUDA libraries" "FAIL" "no site-packages/nvidia/*/lib under $PYTHON (is PyTorch with CUDA 13 installed?)"
elif [[ -n $missing ]]; then
  row "CUDA libraries" "FAIL" "not found: $missing"
else
  row "CUDA libraries" pass "$(echo "$LD_LIBRARY_PATH" | tr ':' '\n' | sed 's|.*/site-packages/||' | tr '\n' ' ')"
fi

echo "-- GPU"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,compute_cap --format=csv || true
else
  echo "nvidia-smi not found"
fi
"$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "| transformers", transformers.__version__)' || true
cat COMMIT 2>/dev/null | sed 's/^/whet commit /' || true

# ---- K. the kernels against their composed forms, before anything is timed
kernels() {
  "$BUNDLE/bin/cuda_kernels" 2>>"$STEP_LOG" | tee -a "$STEP_LOG"
}
export -f kernels
if wanted kernels; then
  step "CUDA kernels" 120 kernels
  # One row per kernel (and dtype) from the check's KERNEL lines.
  while read -r _ name dtype verdict rest; do
    if [[ $verdict == PASS ]]; then
      row "kernel $name $dtype" pass "$rest"
    else
      row "kernel $name $dtype" "FAIL" "$rest"
    fi
  done < <(grep '^KERNEL ' "$OUT/logs/CUDA_kernels.log.figures" || true)
fi

# ---- 3. parity with transformers, the test binary itself on the GPU
parity() {
  local rc=0
  WHET_TEST_DEVICE=cuda WHET_TEST_DTYPE=$1 WHET_FIXTURES=$BUNDLE/fixtures/hf-reference \
    "$BUNDLE/bin/hf_parity" --test-threads=1 --nocapture ${2:+"$2"} >>"$STEP_LOG" 2>&1 || rc=$?
  # Figures: the worst logits and parameter errors the tests printed, and libtest's count.
  { grep -h -E "logits sample 0|params after 3 steps|^test result" "$STEP_LOG" || true; } |
    sed -E 's/: max abs err/:/; s/^test result: //; s/; [0-9]+ (ignored|measured|filtered out)//g; s/; finished in.*//' |
    awk '{ printf "%s%s", (NR > 1 ? " / " : ""), $0 } END { print "" }'
  return $rc
}
export -f parity
if wanted parity; then
  step "parity fp32" 90 "parity float32"
  # bf16: the comparisons with transformers (saving and resuming do not depend on the dtype).
  step "parity bf16" 90 "parity bfloat16 match_transformers"
fi

# ---- 4. the demo on the GPU
demo() {
  "$WHET" sft --config examples/demo.yaml --output_dir "$OUT/demo" >&2
  "$PYTHON" - "$OUT/demo" <<'EOF'
import glob, json, sys
[log] = glob.glob(sys.argv[1] + "/v*/logging.jsonl")
evals = [json.loads(l) for l in open(log) if l.startswith('{"eval_loss"')]
last = evals[-1]
print(f"eval_exact_match {last['eval_exact_match']} at {last['global_step/max_steps']}, eval_loss {last['eval_loss']:.4f}, {last['elapsed_time']}")
sys.exit(0 if last["eval_exact_match"] >= 0.9 else 1)
EOF
}
export -f demo
if wanted demo; then
  step "demo on the GPU" 150 demo
fi

# ---- 5. one NCCL rank, end to end, as torchrun launches it
nccl_rank() {
  "$PYTHON" -m torch.distributed.run --nproc_per_node=1 --no_python "$WHET" sft \
    --config examples/demo.yaml --deepspeed zero2 --max_steps 60 --eval_strategy no \
    --save_steps 60 --output_dir "$OUT/nccl" >&2
  "$PYTHON" - "$OUT/nccl" <<'EOF'
import glob, json, sys
[run] = glob.glob(sys.argv[1] + "/v*")
losses = [json.loads(l)["loss"] for l in open(run + "/logging.jsonl") if l.startswith('{"loss"')]
saved = glob.glob(run + "/checkpoint-60/model.safetensors")
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over 60 steps, checkpoint-60 {'saved' if saved else 'MISSING'}")
sys.exit(0 if saved and losses[-1] < losses[0] else 1)
EOF
}
export -f nccl_rank
if wanted nccl; then
  step "NCCL rank (torchrun, zero2)" 90 nccl_rank
fi

# ---- 6. whet bench beside torch_train_bench.py (last: the longest, and what a short budget cuts)
bench_pair() {
  local size=$1 batch=$2 seq=$3 steps=$4
  local shape=(--size "$size" --batch "$batch" --seq "$seq" --steps "$steps")
  local rc=0 base=$OUT/bench-$size
  # whet's composed candle ops (the default), then with its CUDA kernels.
  "$WHET" bench train "${shape[@]}" --device cuda --torch_dtype bfloat16 >"$base-whet.json" || rc=1
  WHET_CUDA_KERNELS=1 "$WHET" bench train "${shape[@]}" --device cuda --torch_dtype bfloat16 \
    >"$base-whet-kernels.json" || rc=1
  "$PYTHON" "$BUNDLE/torch_train_bench.py" "${shape[@]}" --device cuda --dtype bfloat16 \
    >"$base-torch.json" || rc=1
  if "$PYTHON" "$BUNDLE/torch_train_bench.py" --help | grep -q -- --compile; then
    "$PYTHON" "$BUNDLE/torch_train_bench.py" "${shape[@]}" --device cuda --dtype bfloat16 --compile \
      >"$base-torch-compile.json" || rc=1
  fi
  "$PYTHON" - "$base" "$batch" "$seq" <<'EOF' || rc=1
import json, os, sys
base = sys.argv[1]
def last_json(path):
    if not os.path.exists(path):
        return None
    lines = [l for l in open(path) if l.startswith("{")]
    return json.loads(lines[-1]) if lines else None
def whet(path):
    r = last_json(path)
    return r and (r["tokens_per_s"], r["step_ms"], r["mfu"] or 0, r["peak_gpu_gib"] or 0)
def torch(path):
    r = last_json(path)
    return r and (r["tokens_per_sec"], 1000 * r["step_time_s_mean"], r["mfu"] or 0, r["peak_gpu_mem_gib"] or 0)
runs = [("whet", whet(base + "-whet.json")), ("whet+kernels", whet(base + "-whet-kernels.json")),
        ("torch eager", torch(base + "-torch.json")), ("torch compile", torch(base + "-torch-compile.json"))]
parts = [f"batch {sys.argv[2]} x seq {sys.argv[3]}"]
for name, r in runs:
    parts.append(f"{name} {r[0]:.0f} tok/s, {r[1]:.0f} ms/step, MFU {100 * r[2]:.1f} %, {r[3]:.1f} GiB"
                 if r else f"{name} failed")
got = dict(runs)
for mine in ("whet", "whet+kernels"):
    for theirs in ("torch eager", "torch compile"):
        if got[mine] and got[theirs]:
            parts.append(f"{mine}/{theirs} {got[mine][0] / got[theirs][0]:.2f}")
print("; ".join(parts))
sys.exit(0 if all(r for _, r in runs[:3]) else 1)
EOF
  return $rc
}
export -f bench_pair
if wanted bench; then
  for bench in "${BENCHES[@]}"; do
    read -r size batch seq steps <<<"$bench"
    step "bench $size" 200 "bench_pair $size $batch $seq $steps"
  done
fi

# ---- 7. the table
echo
echo "whet GPU checks, $(cat COMMIT 2>/dev/null || echo unknown), $(($(date +%s) - START)) s"
echo
echo "| check | result | figures |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
