"""The keyword options of the mock provider.

Written without postponed annotations: a ``TypedDict`` of string annotations compiles each one
when the class is made, which the import of every ``get_backend("mock")`` would pay.
"""

from collections.abc import Mapping, Sequence
from typing import TypedDict

from sagellm_backend.dtypes import CollectiveOp, DType, KernelKind, ReduceOp

__all__ = ["MockOptions"]


class MockOptions(TypedDict, total=False):
    """Keyword options of MockBackendProvider that every rank of a world shares."""

    supported_dtypes: Sequence[DType | str] | None
    supported_kernels: Sequence[KernelKind | str] | None
    has_collective: bool
    has_graph_exec: bool
    max_memory_mb: int
    has_stream: bool
    has_event: bool
    has_kv_block_copy: bool
    has_kv_block_migrate: bool
    supported_collectives: Sequence[CollectiveOp | str]
    supported_reduce_ops: Sequence[ReduceOp | str]
    supported_ops: Sequence[str] | None
    device_name: str | None
    device_type: str
    compute_capability: str | None
    total_memory_bytes: int | None
    available_memory_bytes: int | None
    max_batch_size: int | None
    max_sequence_length: int | None
    extra: Mapping[str, str] | None
    num_layers: int
    num_kv_heads: int
    head_size: int
    tokens_per_block: int
    num_devices: int
    device_index: int
    validate_collectives: bool
    collective_timeout: float
