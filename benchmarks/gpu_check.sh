#!/usr/bin/env bash
# One command for a GPU machine: parity on the card first, then the benchmark table.
#   bash benchmarks/gpu_check.sh [extra bench_loss.py arguments]      (PY=... to pick the python)
# Prints the card, runs the default training step's check, then the CUDA tests (parity, no host
# sync, CUDA graph capture, recompilation),
# then benchmarks/bench_loss.py on the GPU shapes and benchmarks/bench_linear.py on the LM head
# shape (N = 8192, H = 4096, C = 128256, bfloat16). Results land in benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
# The device image's python3 already holds torch, triton, pytest, numpy, ninja and matplotlib, and
# nothing can be fetched there, so this installs nothing: it only builds the extension in place.
PY=${PY:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # Hopper only: a shorter build
export MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
$PY -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -3
# First the default training step as users run it (loss.backward(), mean and sum, C = 32000 and
# 128256, bf16 and fp32, loss and fused head): forward writes the gradient, backward skips it.
$PY -m pytest -q tests/test_cuda_parity.py -k "default_training_step" 2>&1 | tail -15
default_path=${PIPESTATUS[0]}
$PY -m pytest -q --maxfail=20 tests/test_cuda_parity.py tests/test_contract.py tests/test_linear.py \
  tests/test_distributed_cuda.py -k "cuda and not default_training_step" 2>&1 | tail -15
parity=${PIPESTATUS[0]}
[ "$default_path" -ne 0 ] && parity=$default_path
$PY benchmarks/bench_loss.py --device cuda "$@"
# The fused classifier + loss head (issue 13): ours vs unfused eager / compiled, Liger, CCE.
$PY benchmarks/bench_linear.py --device cuda --shapes 8192x4096x128256:bfloat16 \
  --json benchmarks/results/linear-cuda.json
exit $parity
