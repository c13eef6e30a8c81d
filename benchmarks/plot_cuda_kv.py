"""Plot the cuda KV-movement figures: bandwidth against the number of blocks.

    sagellm-backend bench cuda --device-suite --json > kv_movement.json   # on the GPU machine
    python benchmarks/plot_cuda_kv.py kv_movement.json docs/cuda-kv-movement.png

Left: batched block copy (read + written bytes) with the contiguous-copy roofline and the
straightforward implementations. Right: swap out and in against pinned contiguous copies of the
same bytes, and the per-block swap loop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(figures: dict[str, object], out: Path) -> None:
    rows = figures["rows"]
    assert isinstance(rows, list)
    blocks = [r["blocks"] for r in rows]

    def series(key: str) -> list[float]:
        return [r[key] for r in rows]

    fig, (copy, swap) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    roofline = float(str(figures["roofline_gbps"]))
    copy.axhline(
        roofline,
        color="black",
        linestyle="--",
        label=f"roofline: 4 GiB D2D copy ({roofline:.0f} GB/s)",
    )
    copy.plot(blocks, series("copy_gbps"), "o-", label="kv_blocks_copy (one Triton launch)")
    copy.plot(
        blocks, series("index_per_layer_gbps"), "s-", label="index_select + index_copy_ per layer"
    )
    copy.plot(blocks, series("per_block_loop_gbps"), "^-", label="copy_ per block per layer")
    copy.set_title("Scattered block copy, read + written bytes")
    swap.plot(blocks, series("pinned_d2h_gbps"), "k--", label="pinned contiguous D2H copy")
    swap.plot(blocks, series("pinned_h2d_gbps"), "k:", label="pinned contiguous H2D copy")
    swap.plot(blocks, series("swap_out_gbps"), "o-", label="swap out (kv_blocks_migrate to host)")
    swap.plot(blocks, series("swap_in_gbps"), "s-", label="swap in (kv_blocks_migrate to device)")
    swap.plot(
        blocks,
        series("swap_per_block_loop_gbps"),
        "^-",
        label="swap out, copy_ per block per layer",
    )
    swap.set_title("Swap to and from pinned host memory, bytes moved")
    for ax in (copy, swap):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("blocks per batch (2 MiB each: 32 layers x 64 KiB)")
        ax.set_ylabel("GB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{figures['gpu']}, torch {figures['torch']}, {figures['date']}: Llama-3-8B-like KV "
        f"cache (bf16), median of {figures['repeats']}"
    )
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
