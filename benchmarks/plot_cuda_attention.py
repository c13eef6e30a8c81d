"""Plot the cuda attention figures: decode bandwidth against context, prefill rate against length.

    sagellm-backend bench cuda --device-suite --json > suite.json   # on the GPU machine
    python benchmarks/plot_cuda_attention.py suite.json docs/cuda-attention.png

Left: paged decode (K and V bytes read over time) at 131072 cached tokens per step, with the
device-to-device copy roofline and torch SDPA on the same K and V laid out contiguously. Right:
paged causal prefill at 16384 new tokens per batch against SDPA's flash backend on the same
shapes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(figures: dict[str, Any], out: Path) -> None:
    attention = figures["attention"]
    decode = [r for r in attention["decode"] if r["name"].startswith("decode_ctx")]
    prefill = [r for r in attention["prefill"] if r["name"].startswith("prefill_len")]
    roofline = float(figures["roofline_gbps"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    contexts = [r["context"] for r in decode]
    left.axhline(
        roofline, color="black", linestyle="--", label=f"copy roofline ({roofline:.0f} GB/s)"
    )
    left.plot(contexts, [r["gbps"] for r in decode], "o-", label="paged_attention_decode (Triton)")
    left.plot(contexts, [r["sdpa_gbps"] for r in decode], "s--", label="torch SDPA, contiguous K/V")
    left.set(
        xscale="log",
        xlabel="context length (tokens; batch x context = 131072)",
        ylabel="K+V read, GB/s",
        title="Decode, 32/8 heads, d 128, bf16",
        ylim=(0, roofline * 1.1),
    )
    left.legend()
    lengths = [r["new_tokens"] for r in prefill]
    right.plot(
        lengths, [r["tflops"] for r in prefill], "o-", label="paged_attention_prefill (Triton)"
    )
    right.plot(
        lengths,
        [r["sdpa_flash_tflops"] for r in prefill],
        "s--",
        label="torch SDPA, flash backend, contiguous",
    )
    right.set(
        xscale="log",
        xlabel="prompt length (tokens; batch x length = 16384)",
        ylabel="TFLOP/s (4 x d x heads x unmasked pairs)",
        title="Causal prefill, 32/8 heads, d 128, bf16",
        ylim=(0, None),
    )
    right.legend()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
