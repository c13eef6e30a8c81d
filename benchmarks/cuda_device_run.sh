#!/usr/bin/env bash
# One call on a GPU machine: install the wheels built into .whl/, run the cuda wheel's tests,
# the conformance kit through the CLI, the generic bench and the KV-movement device suite.
# Logs and JSON go to $OUT (default: ./cuda-run). Usage: benchmarks/cuda_device_run.sh [tests|bench|all]
set -uo pipefail
what="${1:-all}"
out="${OUT:-cuda-run}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' | tee -a "$out/gpu.txt"
if [[ "$what" == tests || "$what" == all ]]; then
  timeout 240 python3 -m pytest packages/isagellm-backend-cuda/tests -p no:cacheprovider -q \
    -rs 2>&1 | tee "$out/pytest.log" | tail -40
  timeout 120 python3 -m sagellm_backend check cuda --json > "$out/check.json" 2> /dev/null
  timeout 120 python3 -m sagellm_backend check cuda 2>&1 | tail -60 | tee "$out/check.txt"
  timeout 90 python3 -m sagellm_backend bench cuda 2>&1 | tee "$out/bench_generic.txt" | tail -12
fi
if [[ "$what" == bench || "$what" == all ]]; then
  timeout 240 python3 -m sagellm_backend bench cuda --device-suite --json \
    > "$out/kv_movement.json" 2> "$out/bench.log"
  python3 -c 'import json, sys; from sagellm_backend_cuda.bench import format_table
print(format_table(json.load(open(sys.argv[1]))))' "$out/kv_movement.json" | tee "$out/kv_movement.md"
fi
