#!/usr/bin/env bash
# One call on a GPU machine: install the wheels built into .whl/, then run the end-to-end model
# (tiny shape against the float64 reference; Llama-3.2-1B shape against its bandwidth floor),
# the device suite (KV movement, attention, model kernels), the cuda wheel's tests, the
# conformance kit and the host-cost bench. Results go to $OUT (default: ./cuda-run), at most
# eight files. Usage: benchmarks/cuda_device_run.sh
set -uo pipefail
out="${OUT:-cuda-run}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  date -u
} | tee "$out/gpu.txt"
llama="$out/llama.jsonl"
timeout 90 python3 examples/tiny_llama.py --spec cuda --dtype fp32 --json >> "$llama" 2>> "$out/gpu.txt"
timeout 90 python3 examples/tiny_llama.py --spec cuda --dtype bf16 --json >> "$llama" 2>> "$out/gpu.txt"
timeout 150 python3 benchmarks/tiny_llama_bench.py --spec cuda --shape llama-1b --dtype bf16 \
  --batch 64 --context 2048 --new-tokens 16 --graph >> "$llama" 2>> "$out/gpu.txt"
tail -c 3000 "$llama"
timeout 240 python3 -m sagellm_backend bench cuda --device-suite --quick --json \
  > "$out/suite.json" 2>> "$out/gpu.txt"
python3 -c 'import json, sys; from sagellm_backend_cuda.bench import format_table
print(format_table(json.load(open(sys.argv[1]))))' "$out/suite.json" > "$out/suite.md"
cat "$out/suite.md"
python3 benchmarks/plot_cuda_attention.py "$out/suite.json" "$out/cuda-attention.png" 2>> "$out/gpu.txt"
timeout 150 python3 -m pytest packages/isagellm-backend-cuda/tests -p no:cacheprovider -q -rs \
  > "$out/pytest.log" 2>&1
tail -5 "$out/pytest.log"
timeout 90 python3 -m sagellm_backend check cuda > "$out/check.txt" 2>&1
tail -5 "$out/check.txt"
timeout 60 python3 -m sagellm_backend bench cuda --json > "$out/bench_host.json" 2>> "$out/gpu.txt"
