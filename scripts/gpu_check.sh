#!/usr/bin/env bash
# The GPU figures of issue #12 in one run (docs/benchmarks.md): run it once on a CUDA machine from the
# repository root, with torch (CUDA build) and the project's dependencies importable:
#     bash scripts/gpu_check.sh [OUT_DIR]
# Writes OUT_DIR (default gpu_check/) with one JSON or log per figure and prints a summary. Nothing here
# is needed by the tests; without a GPU docs/benchmarks.md says the figures are pending.
set -euo pipefail
OUT=${1:-gpu_check}
PEAK_TFLOPS=${PEAK_TFLOPS:-}  # dense bf16 peak of the GPU; default: looked up from its name below
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MOE_CACHE_DIR="$PWD/$OUT/cache"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.version.cuda)" | tee "$OUT/torch.txt"

# 1. One MoE layer vs dense at equal active FLOPs, bf16, d_model 2048 (target: G=8 >= 0.9 of dense)
python -m moe.model.bench --device cuda --dtypes bf16 --d-model 2048 --d-ff 8192 --granularities 1,8,16 \
  --tokens 16384 --warmup 3 --repeat 10 --json > "$OUT/layer_bench.json"

# 2. Tokens/s and MFU of a small-preset point at G=1 and G=8 with torch.compile (target >= 40% MFU at G=8)
for G in 1 8; do
  python -m studies.run infra=basic model=small granularity=$G tokens=10000000 train.device=cuda \
    train.compile=true study.name=gpu_check_g$G paths.root="$OUT/outputs" \
    > "$OUT/point_g$G.log" 2>&1
done

# 3. FSDP2 + EP smoke run: one GPU means world size 1 (EP=1), so this checks the fsdp code path on CUDA
#    (bf16 params, fp32 reduce) end to end, not the all-to-all; that needs >= 2 GPUs.
torchrun --standalone --nproc-per-node 1 -m studies.run infra=basic model=small granularity=8 \
  tokens=2000000 train.device=cuda parallel.mode=fsdp study.name=gpu_check_fsdp paths.root="$OUT/outputs" \
  > "$OUT/fsdp_smoke.log" 2>&1

python - "$OUT" "$PEAK_TFLOPS" <<'PY'
import json, pathlib, sys
out, peak = pathlib.Path(sys.argv[1]), sys.argv[2]
name = (out / "gpu.csv").read_text().splitlines()[1]
peaks = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16 TFLOP/s
peak = float(peak) if peak else next((v for k, v in peaks.items() if k in name), None)
print("layer bench (ratio = MoE wall / dense wall; throughput vs dense = 1 / ratio):")
for row in json.loads((out / "layer_bench.json").read_text()):
    print(" ", {k: row[k] for k in row if k in ("G", "dtype", "backend", "ratio", "moe_ms", "dense_ms", "mem_ratio")})
for g in (1, 8):
    (summary,) = (out / "outputs" / f"gpu_check_g{g}").glob("runs/*/summary.json")
    s = json.loads(summary.read_text())
    flops_s = s["flops"] / s["wall_s"]
    mfu = f"{flops_s / (peak * 1e12):.1%}" if peak else "unknown peak (set PEAK_TFLOPS)"
    print(f"small G={g}: {s['tokens_per_s']:,.0f} tokens/s, {flops_s / 1e12:.1f} TFLOP/s, MFU {mfu}")
fsdp = list((out / "outputs" / "gpu_check_fsdp").glob("runs/*/summary.json"))
print("fsdp smoke:", json.loads(fsdp[0].read_text())["status"] if fsdp else "no summary (see fsdp_smoke.log)")
PY
