"""The catalogue of standard op names: what each does, its kind, its signature, who may refuse it.

One table that the provider protocols (``get_op`` overloads), the capability (``supported_ops``),
the conformance kit and the docs read. An op is *claimed* by listing its name in
``capability().supported_ops``: a claimed op works; asking for an unclaimed one raises
CapabilityError at once.

Two families:

- provider methods (``kv_cache``, ``kv_grow``, ``batch_metadata``): bookkeeping every backend
  can offer, the mock included;
- kernels, looked up with ``get_op(name)`` / ``find_op(name)`` and queued on the current stream.
  Their typed signatures are the callable protocols in :mod:`sagellm_backend.protocols.ops`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from sagellm_backend.dtypes import KernelKind
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.frozen import Frozen

__all__ = ["KERNEL_OPS", "PROVIDER_OPS", "STANDARD_OPS", "OpName", "StandardOp", "op_names"]

OpName = Literal[
    "kv_cache_write",
    "paged_attention_decode",
    "paged_attention_prefill",
    "rotary_cos_sin_cache",
    "rotary_embedding",
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "sample",
]
"""The standard kernel names ``get_op`` and ``find_op`` accept."""


class StandardOp(Frozen):
    """One standard name: a kernel (``kind`` set) or a provider method (``kind`` None).

    ``writes`` names the arguments a kernel writes into, by position (or by name where the
    parameter is keyword-only); checks compare them as well as the return value.
    """

    name: str
    summary: str
    signature: str
    kind: KernelKind | None = None
    writes: tuple[int | str, ...] = ()


PROVIDER_OPS: tuple[StandardOp, ...] = (
    StandardOp(
        "kv_cache",
        "one layer's KV cache as the backend's tensor, laid out as KVLayout describes",
        "kv_cache(layer, device=None) -> T[num_pages, 2, tokens_per_block, kv_heads, head_size]",
    ),
    StandardOp(
        "kv_grow",
        "grow blocks in place by whole pages, without copying",
        "kv_blocks_grow(blocks, num_tokens) -> list[KVBlock]",
    ),
    StandardOp(
        "batch_metadata",
        "a batch's block tables, slot mapping, positions and lengths in persistent buffers",
        "create_batch_metadata(max_seqs, max_tokens, max_pages_per_seq) -> BatchMetadata[T]",
    ),
)

KERNEL_OPS: tuple[StandardOp, ...] = (
    StandardOp(
        "kv_cache_write",
        "write new K and V into cache slots given a slot mapping (slot -1: skipped)",
        "(key[n, kv_heads, d], value[n, kv_heads, d], kv_cache, slot_mapping[n]) -> None",
        KernelKind.ATTENTION,
        writes=(2,),
    ),
    StandardOp(
        "paged_attention_decode",
        "one query token per sequence over its cached K and V, read through its pages",
        "(query[b, heads, d], kv_cache, block_tables[b, w], seq_lens[b], scale, *, out=None) "
        "-> T[b, heads, d]",
        KernelKind.ATTENTION,
        writes=("out",),
    ),
    StandardOp(
        "paged_attention_prefill",
        "causal attention of variable-length new tokens over each sequence's cached prefix "
        "and themselves (prefill and chunked prefill)",
        "(query[n, heads, d], kv_cache, block_tables[b, w], seq_lens[b], query_start_loc[b + 1], "
        "max_query_len, scale, *, out=None) -> T[n, heads, d]",
        KernelKind.ATTENTION,
        writes=("out",),
    ),
    StandardOp(
        "rotary_cos_sin_cache",
        "the cos/sin table rotary_embedding reads, built on the backend's device",
        "(max_position, rotary_dim, base=10000.0, *, dtype='fp32') -> T[max_position, rotary_dim]",
        KernelKind.FUSION,
    ),
    StandardOp(
        "rotary_embedding",
        "rotate the first rotary_dim features of each head of query and key in place "
        "(NeoX halves or interleaved pairs)",
        "(positions[n], query[n, heads, d], key[n, kv_heads, d], cos_sin_cache, *, "
        "is_neox=True) -> (query, key)",
        KernelKind.FUSION,
        writes=(1, 2),
    ),
    StandardOp(
        "rms_norm",
        "x / sqrt(mean(x**2) + eps) * weight over the last dimension",
        "(x[..., h], weight[h], eps=1e-6) -> T[..., h]",
        KernelKind.LAYERNORM,
    ),
    StandardOp(
        "fused_add_rms_norm",
        "residual += x, then x = rms_norm(residual), both in place",
        "(x[..., h], residual[..., h], weight[h], eps=1e-6) -> (x, residual)",
        KernelKind.LAYERNORM,
        writes=(0, 1),
    ),
    StandardOp(
        "silu_and_mul",
        "silu(gate) * up where x is [gate, up] along the last dimension",
        "(x[..., 2 * d]) -> T[..., d]",
        KernelKind.FUSION,
    ),
    StandardOp(
        "sample",
        "one token per row: greedy where temperature is 0, else top-k / top-p filtered "
        "sampling at the temperature, drawn from a fixed function of the row's seed",
        "(logits[b, vocab], temperature[b], top_k[b], top_p[b], seeds[b]) -> T[b] int64",
        KernelKind.FUSION,
    ),
)

STANDARD_OPS: dict[str, StandardOp] = {op.name: op for op in (*PROVIDER_OPS, *KERNEL_OPS)}
"""Every standard name, provider methods first, in catalogue order."""


def op_names(names: Iterable[str], what: str = "supported_ops") -> tuple[str, ...]:
    """Standard op names, deduplicated, in catalogue order; an unknown name is refused."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise InvalidArgumentError(
            f"{what} must be a sequence of op names, got {type(names).__name__}",
            hint="pass a list such as ['rms_norm', 'sample']",
        )
    wanted = list(names)
    unknown = [n for n in wanted if not isinstance(n, str) or n not in STANDARD_OPS]
    if unknown:
        raise InvalidArgumentError(
            f"unknown standard ops {unknown!r}",
            hint=f"standard ops: {', '.join(STANDARD_OPS)}",
        )
    return tuple(name for name in STANDARD_OPS if name in wanted)
