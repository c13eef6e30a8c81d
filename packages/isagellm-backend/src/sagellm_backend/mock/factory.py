"""``create_mock_backend``: the ``mock`` entry point of the ``sagellm.backends`` group.

Every constructor option of MockBackendProvider is declared, so a config string such as
``mock?max_memory_mb=1024&supported_dtypes=fp16+fp32`` is validated before anything is created.
List-valued options are strings joined with ``+``. The mock has the lowest priority: ``auto``
never chooses it.
"""

from __future__ import annotations

from sagellm_backend.factory import LIST_SEPARATOR, BackendFactory, DeviceSelection, Option
from sagellm_backend.kv import KVLayout
from sagellm_backend.mock.provider import (
    DEFAULT_DTYPES,
    DEFAULT_KERNELS,
    MOCK_OPS,
    MockBackendProvider,
)

__all__ = ["MOCK_PRIORITY", "create_mock_backend"]

MOCK_PRIORITY = -100
"""Below every real backend."""

_LAYOUT = KVLayout()


def _joined(values: tuple[str, ...]) -> str:
    return LIST_SEPARATOR.join(values)


def _listed(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [item.strip() for item in text.split(LIST_SEPARATOR)] if text.strip() else []


_OPTIONS = (
    Option(
        "supported_dtypes",
        str,
        _joined(tuple(d.value for d in DEFAULT_DTYPES)),
        "dtypes joined with '+', such as fp16+bf16",
    ),
    Option(
        "supported_kernels",
        str,
        _joined(tuple(k.value for k in DEFAULT_KERNELS)),
        "kernel kinds joined with '+', such as matmul+attention",
    ),
    Option("has_collective", bool, True, "whether collectives are offered"),
    Option("has_graph_exec", bool, False, "whether graph capture is offered"),
    Option("max_memory_mb", int, 16384, "KV memory of each mock device, in MiB"),
    Option("has_stream", bool, True, "whether streams can be created"),
    Option("has_event", bool, True, "whether events can be created"),
    Option("has_kv_block_copy", bool, True, "whether KV blocks can be copied"),
    Option("has_kv_block_migrate", bool, True, "whether KV blocks can be migrated"),
    Option(
        "supported_collectives",
        str,
        None,
        "collective ops joined with '+', such as all_reduce+barrier (default: all)",
    ),
    Option(
        "supported_reduce_ops",
        str,
        None,
        "reduce ops joined with '+', such as sum+max (default: all)",
    ),
    Option(
        "supported_ops",
        str,
        None,
        f"standard ops claimed, joined with '+', from {'+'.join(MOCK_OPS)} (default: all)",
    ),
    Option("device_name", str, None, "device name reported by capability()"),
    Option("device_type", str, "mock", "device type reported by capability()"),
    Option("compute_capability", str, None, "compute capability reported by capability()"),
    Option("total_memory_bytes", int, None, "total memory reported (default: max_memory_mb)"),
    Option("available_memory_bytes", int, None, "available memory reported at creation"),
    Option("max_batch_size", int, None, "largest batch the backend claims"),
    Option("max_sequence_length", int, None, "longest sequence the backend claims"),
    Option("num_layers", int, _LAYOUT.num_layers, "KV layout: layers"),
    Option("num_kv_heads", int, _LAYOUT.num_kv_heads, "KV layout: KV heads per layer"),
    Option("head_size", int, _LAYOUT.head_size, "KV layout: elements per head"),
    Option("tokens_per_block", int, _LAYOUT.tokens_per_block, "KV layout: tokens per page"),
    Option("num_devices", int, 2, "mock devices the provider can migrate between"),
    Option("validate_collectives", bool, True, "check that every rank issues matching collectives"),
    Option("collective_timeout", float, 60.0, "default collective timeout, in seconds"),
)


def _create(
    *,
    device: DeviceSelection,
    supported_dtypes: str,
    supported_kernels: str,
    has_collective: bool,
    has_graph_exec: bool,
    max_memory_mb: int,
    has_stream: bool,
    has_event: bool,
    has_kv_block_copy: bool,
    has_kv_block_migrate: bool,
    device_type: str,
    num_layers: int,
    num_kv_heads: int,
    head_size: int,
    tokens_per_block: int,
    num_devices: int,
    validate_collectives: bool,
    collective_timeout: float,
    supported_collectives: str | None = None,
    supported_reduce_ops: str | None = None,
    supported_ops: str | None = None,
    device_name: str | None = None,
    compute_capability: str | None = None,
    total_memory_bytes: int | None = None,
    available_memory_bytes: int | None = None,
    max_batch_size: int | None = None,
    max_sequence_length: int | None = None,
) -> MockBackendProvider:
    return MockBackendProvider(
        _listed(supported_dtypes),
        _listed(supported_kernels),
        has_collective,
        has_graph_exec,
        max_memory_mb,
        has_stream=has_stream,
        has_event=has_event,
        has_kv_block_copy=has_kv_block_copy,
        has_kv_block_migrate=has_kv_block_migrate,
        supported_collectives=_listed(supported_collectives) or (),
        supported_reduce_ops=_listed(supported_reduce_ops) or (),
        supported_ops=_listed(supported_ops),
        device_name=device_name,
        device_type=device_type,
        compute_capability=compute_capability,
        total_memory_bytes=total_memory_bytes,
        available_memory_bytes=available_memory_bytes,
        max_batch_size=max_batch_size,
        max_sequence_length=max_sequence_length,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_size=head_size,
        tokens_per_block=tokens_per_block,
        num_devices=num_devices,
        device_index=0 if device.index is None else device.index,
        validate_collectives=validate_collectives,
        collective_timeout=collective_timeout,
    )


create_mock_backend: BackendFactory[MockBackendProvider] = BackendFactory(
    "mock",
    _create,
    options=_OPTIONS,
    priority=MOCK_PRIORITY,
    description="pure-Python fake device for tests and CI: real bytes, deferred streams, "
    "simulated collectives",
)
