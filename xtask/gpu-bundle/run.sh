#!/usr/bin/env bash
# whet's GPU checks, from the folder `cargo xtask gpu-bundle` writes (target/gpu-bundle/), on a
# machine with one H100/H200, PyTorch 2.11 with its CUDA 13 wheels and transformers; no network,
# no cargo. In under 8 minutes, each step with its own timeout and all within one deadline:
#
#   1. unpack bin/whet and bin/hf_parity (xz, through Python's lzma);
#   2. LD_LIBRARY_PATH from PyTorch's wheels only (site-packages/nvidia/*/lib: cu13, nccl, ...);
#      the binaries carry no CUDA libraries and the driver's libcuda comes from the system;
#   3. the transformers parity tests (engine/tests/hf_parity.rs, the same test binary CI runs)
#      on the GPU in fp32 (the fixture README's float32 tolerances) and in bf16 (the test's bf16
#      tolerances);
#   4. the demo (examples/demo.yaml) trained on the GPU, its last eval_exact_match >= 0.9;
#   5. one NCCL rank end to end: torchrun --nproc_per_node=1 --no_python whet sft --deepspeed zero2;
#   6. `whet bench train` beside torch_train_bench.py, both --device cuda --dtype bfloat16, on the
#      same presets, batches and sequence lengths;
#   7. a markdown table of every check, last.
#
# A failing step is reported in the table and the rest still run; the exit status is 1 if any
# failed. Logs and outputs go to $WHET_GPU_OUT (default ./out).
#
#   ./run.sh                    # PYTHON=python3; set PYTHON to the interpreter that has torch
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

# The bench: preset, sequences per step, tokens per sequence, steps (the first 2 untimed).
BENCHES=(
  "small 8 512 8"
  "qwen3-0.6b 4 2048 5"
  "qwen3-30b-a3b-4l 2 2048 4"
)

rm -rf "$OUT"
mkdir -p "$OUT/logs"
ROWS=()
FAILED=0

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
for name in whet hf_parity; do
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
missing=$( (ldd bin/whet bin/hf_parity 2>/dev/null || true) | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')
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
step "parity fp32" 90 "parity float32"
# bf16: the comparisons with transformers (saving and resuming do not depend on the dtype).
step "parity bf16" 90 "parity bfloat16 match_transformers"

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
step "demo on the GPU" 150 demo

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
step "NCCL rank (torchrun, zero2)" 90 nccl_rank

# ---- 6. whet bench beside torch_train_bench.py (last: the longest, and what a short budget cuts)
bench_pair() {
  local size=$1 batch=$2 seq=$3 steps=$4
  local shape=(--size "$size" --batch "$batch" --seq "$seq" --steps "$steps")
  local rc=0
  "$WHET" bench train "${shape[@]}" --device cuda --torch_dtype bfloat16 >"$OUT/bench-$size-whet.json" || rc=1
  "$PYTHON" "$BUNDLE/torch_train_bench.py" "${shape[@]}" --device cuda --dtype bfloat16 \
    >"$OUT/bench-$size-torch.json" || rc=1
  "$PYTHON" - "$OUT/bench-$size-whet.json" "$OUT/bench-$size-torch.json" "$batch" "$seq" <<'EOF' || rc=1
import json, sys
def last_json(path):
    lines = [l for l in open(path) if l.startswith("{")]
    return json.loads(lines[-1]) if lines else None
whet, torch = last_json(sys.argv[1]), last_json(sys.argv[2])
parts = [f"batch {sys.argv[3]} x seq {sys.argv[4]}"]
if whet:
    parts.append(f"whet {whet['tokens_per_s']:.0f} tok/s, {whet['step_ms']:.0f} ms/step, MFU {100 * (whet['mfu'] or 0):.1f} %, "
                 f"{(whet['peak_gpu_gib'] or 0):.1f} GiB")
if torch:
    parts.append(f"torch {torch['tokens_per_sec']:.0f} tok/s, {1000 * torch['step_time_s_mean']:.0f} ms/step, MFU {100 * (torch['mfu'] or 0):.1f} %, "
                 f"{torch['peak_gpu_mem_gib'] or 0:.1f} GiB")
if whet and torch:
    parts.append(f"whet/torch {whet['tokens_per_s'] / torch['tokens_per_sec']:.2f}")
print("; ".join(parts))
sys.exit(0 if whet and torch else 1)
EOF
  return $rc
}
export -f bench_pair
for bench in "${BENCHES[@]}"; do
  read -r size batch seq steps <<<"$bench"
  step "bench $size" 110 "bench_pair $size $batch $seq $steps"
done

# ---- 7. the table
echo
echo "whet GPU checks, $(cat COMMIT 2>/dev/null || echo unknown), $(($(date +%s) - START)) s"
echo
echo "| check | result | figures |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
