#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go, for a machine lent for minutes: the whole test
# suite (GPU tests compile real Triton kernels; slow tests included), then the GPU benchmarks.
# Each part has its own time limit so one hang cannot eat the rest. Logs go to $1.
#
#     bash benchmarks/gpu_suite.sh benchmarks/results/gpu
set -uo pipefail
out=${1:?usage: gpu_suite.sh LOG_DIR}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 COLUMNS=160 PYTHONDONTWRITEBYTECODE=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, '· triton', triton.__version__)"
} 2>&1 | tee "$out/device.txt"
timeout 270 python3 -m pytest -q -m "" -n 8 -p no:cacheprovider tests 2>&1 \
    | tee "$out/tests.txt" | tail -60
timeout 150 python3 benchmarks/bench_gpt2_gpu.py --model gpt2-small --batch 8 --seq 1024 2>&1 \
    | tee "$out/bench-gpt2-small.txt"
timeout 90 python3 benchmarks/bench_gpt2_gpu.py --model llama-small --batch 4 --seq 1024 \
    --skip-kernels 2>&1 | tee "$out/bench-llama-small.txt"
timeout 150 python3 benchmarks/bench_gpt2_gpu.py --model gpt2-small --batch 8 --seq 1024 \
    --skip-kernels --memory-budget 0.25 2>&1 | tee "$out/bench-gpt2-small-budget.txt"
timeout 150 python3 benchmarks/bench_attention_gpu.py 2>&1 | tee "$out/bench-attention.txt"
timeout 420 python3 benchmarks/bench_step_gpu.py --timeout 150 --steps 10 --out "$out/step-bf16" \
    2>&1 | tail -40
