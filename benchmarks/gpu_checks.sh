#!/usr/bin/env bash
# The GPU checks of the training stage (issue 11) and of extraction (issue 10) in one run, for a
# machine with one CUDA GPU:
#   bash benchmarks/gpu_checks.sh OUT_DIR [BASELINE_TREE]
# 1. the training-step table on the GPU in fp32 (MultiEMO at 32 and 64 dialogues also on
#    BASELINE_TREE's erc package, e.g. `git archive 26c302c erc | tar -x -C DIR`, the revision before
#    one-SDPA-call attention) and in bf16;
# 2. wall time of 100-epoch runs of multiemo and xlstm-multiemo on an IEMOCAP-sized random shard set,
#    side by side with 3. the `gpu`-marked tests (two CUDA epochs, then `erc evaluate` on the CPU
#    reproduces the metrics).
# 4. extraction on one CUDA worker: the networks called per utterance against the cross-utterance
#    batching (`bench_extract.py --device cuda`, 640x360 demo clips, 5 copies = 480 utterances).
# Each part has its own time limit (seconds: STEP_S, TEST_S, FULL_S, EXTRACT_S); what a part leaves unfinished is
# reported as such in OUT_DIR, never estimated. PYTHON picks the interpreter (default python3).
set -u
OUT=${1:-gpu-results}
BASELINE=${2:-}
PY=${PYTHON:-python3}
STEP_S=${STEP_S:-150} TEST_S=${TEST_S:-150} FULL_S=${FULL_S:-300} EXTRACT_S=${EXTRACT_S:-240}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$(date +%s)
stamp() { echo "[$(( $(date +%s) - started )) s] $*" | tee -a "$OUT/timeline.txt"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())"
} > "$OUT/gpu.txt" 2>&1
stamp "$(tr '\n' ' ' < "$OUT/gpu.txt")"

# the random IEMOCAP-shaped shard set is written on the CPU while the step table runs
"$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from bench_full_run import iemocap_shaped_shard_set; iemocap_shaped_shard_set(Path('/tmp/erc-full-run/features'))" \
    > "$OUT/shards.log" 2>&1 &
shards=$!

stamp "step table fp32 (with baseline)"
baseline_args=()
[[ -n $BASELINE ]] && baseline_args=(--baseline-tree "$BASELINE")
timeout "$STEP_S" "$PY" benchmarks/bench_train_step.py --device cuda --repeats 3 --cases multiemo-32,multiemo-64 \
    "${baseline_args[@]}" > "$OUT/step_fp32_baseline.md" 2>&1 || stamp "fp32 baseline table: exit $?"
timeout "$STEP_S" "$PY" benchmarks/bench_train_step.py --device cuda --repeats 3 \
    --cases multiemo-32-store,lmam-32,pairwise-32,mcn-cl-32,xlstm-multiemo-32,xlstm-multiemo-32-slstm > "$OUT/step_fp32.md" 2>&1 || stamp "fp32 table: exit $?"
stamp "step table bf16"
timeout "$STEP_S" "$PY" benchmarks/bench_train_step.py --device cuda --repeats 3 --precision bf16 \
    --cases multiemo-32,multiemo-64,lmam-32,pairwise-32,mcn-cl-32,xlstm-multiemo-32 > "$OUT/step_bf16.md" 2>&1 || stamp "bf16 table: exit $?"
wait "$shards" || stamp "shard set: failed (see shards.log)"

# The two 100-epoch runs and the gpu tests run side by side on the one GPU (each run's wall time is
# therefore an upper bound of what it takes alone).
stamp "100-epoch runs and gpu tests, concurrently"
for model in multiemo xlstm-multiemo; do
    timeout "$FULL_S" "$PY" benchmarks/bench_full_run.py --device cuda --work /tmp/erc-full-run --epochs 100 \
        --models "$model" > "$OUT/full_run_$model.md" 2>&1 &
done
timeout "$TEST_S" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_training_speed.py > "$OUT/pytest_gpu.txt" 2>&1 \
    || stamp "gpu tests: exit $?"
wait
for model in multiemo xlstm-multiemo; do  # a run cut by its limit is NOT done: its last epoch line says how far it got
    { grep -h "epoch" "$OUT/full_run_$model.md" | tail -1; grep -h "^| $model" "$OUT/full_run_$model.md" || echo "$model: NOT finished within $FULL_S s"; } >> "$OUT/timeline.txt"
done
tail -1 "$OUT/pytest_gpu.txt" >> "$OUT/timeline.txt"

stamp "extraction on one CUDA worker"
timeout "$EXTRACT_S" "$PY" benchmarks/bench_extract.py --device cuda --copies 5 --size 640x360 > "$OUT/extract_gpu.md" 2>&1 \
    || stamp "extraction: exit $? (a cut run is NOT done; its finished rows are in extract_gpu.md)"
stamp "done"
