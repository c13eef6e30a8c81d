"""Options every torch backend declares, so they work in config strings (``cpu?num_blocks=64``).

Torch-free: a device wheel's entry point builds its factory from these without importing torch.
"""

from __future__ import annotations

from sagellm_backend.factory import Option
from sagellm_backend.kv import KVLayout

__all__ = ["torch_options"]

_LAYOUT = KVLayout()


def torch_options(*, kv_memory_mb: int, host_kv_memory_mb: int) -> tuple[Option, ...]:
    """The torch layer's options, with the device's default KV memory budgets."""
    return (
        Option("num_layers", int, _LAYOUT.num_layers, "KV layout: transformer layers"),
        Option("num_kv_heads", int, _LAYOUT.num_kv_heads, "KV layout: KV heads per layer"),
        Option("head_size", int, _LAYOUT.head_size, "KV layout: elements per head"),
        Option("tokens_per_block", int, _LAYOUT.tokens_per_block, "KV layout: tokens per page"),
        Option("kv_dtype", str, "fp16", "element type of the KV pool (fp32, fp16 or bf16)"),
        Option(
            "num_blocks",
            int,
            0,
            "pages in the device KV pool; 0 derives it from kv_memory_mb",
        ),
        Option("kv_memory_mb", int, kv_memory_mb, "device KV pool budget in MiB"),
        Option(
            "host_num_blocks",
            int,
            0,
            "pages in the host KV pool (target of migrate to host); 0 derives it from "
            "host_kv_memory_mb",
        ),
        Option("host_kv_memory_mb", int, host_kv_memory_mb, "host KV pool budget in MiB"),
        Option("rank", int, None, "this process's rank (default: $RANK, else 0)"),
        Option("world_size", int, None, "ranks in the world (default: $WORLD_SIZE, else 1)"),
        Option("master_addr", str, None, "rendezvous host (default: $MASTER_ADDR)"),
        Option("master_port", int, None, "rendezvous port (default: $MASTER_PORT)"),
        Option(
            "collective_timeout",
            float,
            300.0,
            "seconds a collective may take before it fails with comm_timeout",
        ),
        Option(
            "validate_collectives",
            bool,
            True,
            "check shapes, dtypes and ops across ranks before each collective (one extra "
            "round trip; turn off for benchmarks)",
        ),
    )
