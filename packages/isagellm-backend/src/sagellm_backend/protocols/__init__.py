"""Structural interfaces every backend satisfies. No logic lives here.

The protocols are generic in the tensor type ``T``: torch backends are
``BackendProvider[torch.Tensor]``, the mock is ``BackendProvider[MockTensor]``. A class
satisfies them by shape alone; no inheritance is needed.

Execution model, as on a real device: operations that touch device data (KV copy and migrate,
writes into blocks or cache slots, collectives, kernels, the upload of a planned batch) are
queued on the current stream and run in order; host-side calls (allocation, growth, freeing,
planning, queries, synchronisation) run at once. Reading data back to the host
(``kv_block_read``) waits for the current stream only, so data produced on another stream needs
an event or stream wait first. A page is reused only after the work queued on it has run.

An engine step: ``batch.plan(...)`` once, then per layer ``kv_cache_write`` of the new K and V,
``paged_attention_prefill`` or ``paged_attention_decode``, and the model's small kernels
(``rotary_embedding``, ``fused_add_rms_norm``, ``silu_and_mul``); ``sample`` at the end.
"""

from sagellm_backend.protocols.collectives import CollectiveOps
from sagellm_backend.protocols.kernels import KernelRegistry
from sagellm_backend.protocols.kv import BatchMetadata, KVBlockManager, KVCacheAccess
from sagellm_backend.protocols.ops import (
    FusedAddRmsNorm,
    KVCacheWrite,
    OpLookup,
    PagedAttentionDecode,
    PagedAttentionPrefill,
    RmsNorm,
    RotaryCosSinCache,
    RotaryEmbedding,
    Sample,
    SiluAndMul,
)
from sagellm_backend.protocols.provider import BackendProvider
from sagellm_backend.protocols.streams import Event, Graph, GraphCapture, Stream, StreamOps

__all__ = [
    "BackendProvider",
    "BatchMetadata",
    "CollectiveOps",
    "Event",
    "FusedAddRmsNorm",
    "Graph",
    "GraphCapture",
    "KVBlockManager",
    "KVCacheAccess",
    "KVCacheWrite",
    "KernelRegistry",
    "OpLookup",
    "PagedAttentionDecode",
    "PagedAttentionPrefill",
    "RmsNorm",
    "RotaryCosSinCache",
    "RotaryEmbedding",
    "Sample",
    "SiluAndMul",
    "Stream",
    "StreamOps",
]
