"""The tiny Llama of examples/tiny_llama.py, timed against its baselines in the same run.

    python benchmarks/tiny_llama_bench.py --spec cpu            # vs transformers, one thread
    python benchmarks/tiny_llama_bench.py --spec cuda --shape llama-1b --batch 64 \\
        --context 2048 --dtype bf16 --graph                       # vs the bandwidth floor

On cpu: batched prefill of the prompts and one decode step of the batch, against transformers'
``LlamaForCausalLM`` with the same weights (left-padded batched prefill, then decode with its KV
cache), medians of interleaved rounds. On a GPU: the decode step (replayed as a graph with
``--graph``) against its bandwidth floor, the bytes a step must read over the device-to-device
copy rate measured in the same run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch


def load_example() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama.py"
    spec = importlib.util.spec_from_file_location("tiny_llama", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_llama"] = module
    spec.loader.exec_module(module)
    return module


def transformers_times(
    example: ModuleType, weights: dict[str, torch.Tensor], prompts: list[list[int]], steps: int
) -> tuple[float, float]:
    """transformers' batched prefill and median decode step, in ms."""
    transformers: Any = importlib.import_module("transformers")  # a benchmark-only dependency
    c = example.SHAPES["tiny"]
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_word_embeddings,
    )
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(weights, strict=False)
    model.eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        prefill = (time.perf_counter() - start) * 1e3
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
            start = time.perf_counter()
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append((time.perf_counter() - start) * 1e3)
            cache = out.past_key_values
    return prefill, statistics.median(times)


def copy_roofline_gbs(device: torch.device) -> float:
    """Device-to-device copy rate, read + written bytes, of a 1 GiB buffer (GB/s)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / 20
    return 2 * src.numel() / seconds / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="cpu")
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--graph", action="store_true")
    args = parser.parse_args(argv)
    example = load_example()
    config = example.SHAPES[args.shape]
    if args.context:
        lengths = [args.context] * args.batch
    else:
        g = torch.Generator().manual_seed(7)
        lengths = torch.randint(5, 61, (args.batch,), generator=g).tolist()
    weights = example.build_weights(config, 0)
    prompts = example.build_prompts(config, lengths, 1)
    report: dict[str, Any] = {"spec": args.spec, "shape": args.shape, "dtype": args.dtype}
    report["prompt_lengths"] = lengths if not args.context else [args.context, args.batch]
    if args.spec == "cpu":
        torch.set_num_threads(1)
        ours_prefill, ours_step, hf_prefill, hf_step = [], [], [], []
        for _ in range(args.rounds):
            backend = example.open_backend(
                "cpu", config, args.dtype, sum(lengths) + args.batch * args.new_tokens
            )
            try:
                result = example.generate(
                    backend, config, weights, prompts, args.new_tokens, example.DTYPES[args.dtype]
                )
            finally:
                backend.close()
            ours_prefill.append(result.prefill_ms)
            ours_step.append(result.decode_step_ms)
            prefill, step = transformers_times(example, weights, prompts, args.new_tokens - 1)
            hf_prefill.append(prefill)
            hf_step.append(step)
        med = statistics.median
        report.update(
            threads=1,
            prefill_ms=med(ours_prefill),
            transformers_prefill_ms=med(hf_prefill),
            prefill_ratio=med(ours_prefill) / med(hf_prefill),
            decode_step_ms=med(ours_step),
            transformers_decode_step_ms=med(hf_step),
            decode_step_ratio=med(ours_step) / med(hf_step),
        )
    else:
        backend = example.open_backend(
            args.spec, config, args.dtype, sum(lengths) + args.batch * args.new_tokens
        )
        try:
            device = backend.kv_cache(0).device
            roofline = copy_roofline_gbs(device)
            result = example.generate(
                backend,
                config,
                weights,
                prompts,
                args.new_tokens,
                example.DTYPES[args.dtype],
                graph=args.graph,
            )
        finally:
            backend.close()
        step_ms = result.graph_step_ms if args.graph else result.decode_step_ms
        floor_bytes = example.step_bytes(
            config, args.dtype, [n + args.new_tokens // 2 for n in lengths]
        )
        floor_ms = floor_bytes / (roofline * 1e9) * 1e3
        report.update(
            copy_roofline_gbs=roofline,
            prefill_ms=result.prefill_ms,
            decode_step_ms=step_ms,
            graph=args.graph,
            floor_bytes=floor_bytes,
            floor_ms=floor_ms,
            ratio_to_floor=step_ms / floor_ms,
            graph_replay_ms=result.graph_replay_ms,
            replay_ratio_to_floor=(
                None if result.graph_replay_ms is None else result.graph_replay_ms / floor_ms
            ),
            ops_called=result.ops_called,
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
