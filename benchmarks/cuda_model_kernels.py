"""The model's kernels and sampling on a GPU, as the device suite times them, in one process.

    python benchmarks/cuda_model_kernels.py [results.json] [--sweep]

Creates a cuda backend through its factory, measures the roofline (a 4 GiB device-to-device
copy, bytes read plus written) and runs :func:`sagellm_backend_cuda.bench_model.model_kernels`,
the device suite's rows for the KV slot write, fused add + rms_norm, rotary, silu_and_mul and
sampling. ``--sweep`` also times other launch shapes of the sampling kernels (the split pass's
chunk, warps and histogram step; the per-row kernel's steps, warps and gathered keys) on the same
data. Prints markdown tables and writes every figure to the JSON file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from itertools import product
from typing import Any

import torch
import triton

from sagellm_backend_cuda import create_cuda_backend
from sagellm_backend_cuda.bench import Timer, _roofline
from sagellm_backend_cuda.bench_model import SAMPLE_BATCH, SAMPLE_VOCAB, format_model_kernels
from sagellm_backend_cuda.bench_model import model_kernels as measure
from sagellm_backend_cuda.sampling import _row_max_kernel, _sample

CASES = (("greedy", 0.0, 0, 1.0), ("top_k", 0.8, 50, 1.0), ("top_p", 0.8, 0, 0.9),
         ("top_k_top_p", 0.8, 50, 0.9), ("top_k_1000", 0.8, 1000, 1.0), ("top_p_0.5", 0.8, 0, 0.5),
         ("no_filter", 0.8, 0, 1.0))  # fmt: skip
"""(name, temperature, top_k, top_p) of the sweep's sampling rows."""


def sweep(
    timer: Timer, roofline: float, device: torch.device, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Times the sampling kernels' launch shapes: each row is one (kernel, shape, case)."""
    g = torch.Generator(device=device).manual_seed(1)
    batch, vocab = SAMPLE_BATCH, SAMPLE_VOCAB
    buffers = [torch.randn(batch, vocab, generator=g, device=device) * 3 for _ in range(4)]
    seeds = torch.randint(0, 2**62, (batch,), generator=g, device=device)
    turn = [0]

    def next_buffer() -> int:
        turn[0] += 1
        return turn[0] % len(buffers)

    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any], op: Callable[[], object]) -> None:
        ms, _ = timer.time(op)
        row.update(us=ms * 1e3, of_roofline=batch * vocab * 4 / ms / 1e6 / roofline)
        rows.append(row)
        say(json.dumps(row))

    def row_max(
        split: int, warps: int, hist: int, args: tuple[torch.Tensor, ...], out: list[torch.Tensor]
    ) -> None:
        _row_max_kernel[(batch, out[0].shape[1])](
            buffers[next_buffer()], vocab, *args, *out, batch, vocab, out[0].shape[1],
            ROWS=1, SPLIT=split, HIST_BLOCK=min(hist, split), num_warps=warps,
        )  # fmt: skip

    def full(value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((batch,), value, dtype=dtype, device=device)

    # The split pass for greedy rows (no histogram) and for top-k rows (the top-byte histogram).
    for (heat, top_k), split, warps, hist in product(
        ((0.0, 0), (0.8, 50)), (2048, 4096, 8192), (4, 8), (512, 1024)
    ):
        if heat == 0 and hist != 512:
            continue
        chunks = triton.cdiv(vocab, split)
        out = [
            torch.empty(batch, chunks, device=device),
            torch.empty(batch, chunks, dtype=torch.int32, device=device),
            torch.empty(batch, chunks, 256, dtype=torch.int32, device=device),
        ]
        record(
            {"kernel": "row_max", "top_k": top_k, "split": split, "warps": warps, "hist": hist},
            partial(
                row_max,
                split,
                warps,
                hist,
                (full(heat, torch.float32), full(top_k, torch.int64)),
                out,
            ),
        )

    def whole(
        heat: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, shape: dict[str, int]
    ) -> None:
        _sample(buffers[next_buffer()], heat, top_k, top_p, seeds, **shape)

    # Both launches, at other shapes of the per-row kernel.
    for case, heat, top_k, top_p in CASES:
        args = (full(heat, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32))
        for shape in (
            {},
            {"scan_block": 8192},
            {"race_block": 2048},
            {"warps": 8},
            {"gather_block": 4096},
            {"gather_block": 16384},
            {"candidates": 1024},
        ):
            record({"kernel": "sample", "case": case, **shape}, partial(whole, *args, shape))
    return rows


def main(argv: list[str]) -> int:
    path = next((a for a in argv if not a.startswith("--")), None)
    provider = create_cuda_backend(None, validate_collectives=False)
    try:
        timer = Timer(9)
        roofline = _roofline(timer, provider.torch_device)
        print(f"roofline: {roofline:.0f} GB/s (4 GiB device copy, read + written)", flush=True)
        figures = measure(provider, timer.time, roofline, say=lambda s: print(s, flush=True))
        figures.update(
            roofline_gbps=roofline,
            gpu=torch.cuda.get_device_name(provider.torch_device),
            torch=torch.__version__,
            triton=triton.__version__,
        )
        print("\n".join(format_model_kernels(figures)))
        for check in figures["checks"]:
            met = "met" if check["met"] else "MISSED"
            print(f"{check['target']}: {check['measured']:.3g} (goal {check['goal']:g}) {met}")
        for sweeping in (False, True):
            if sweeping:
                if "--sweep" not in argv:
                    break
                figures["sweep"] = sweep(
                    timer, roofline, provider.torch_device, lambda s: print(s, flush=True)
                )
            if path:  # written before the sweep too, so a sweep cut short loses nothing else
                with open(path, "w") as f:
                    json.dump(figures, f, indent=1)
    finally:
        provider.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
