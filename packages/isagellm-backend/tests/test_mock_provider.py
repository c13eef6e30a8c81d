"""MockBackendProvider as a whole: protocols, capability flags, kernels, factory, close."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from sagellm_backend import (
    BackendProvider,
    BackendUnavailableError,
    CapabilityError,
    DType,
    ErrorCode,
    InvalidArgumentError,
    KernelExistsError,
    KernelKind,
    KernelNotFoundError,
    MockBackendProvider,
    MockTensor,
    UnknownOptionError,
    create_mock_backend,
)
from sagellm_backend.factory import BackendFactory


def test_the_mock_satisfies_backend_provider_statically_and_at_runtime() -> None:
    provider: BackendProvider[MockTensor] = MockBackendProvider()
    assert isinstance(provider, BackendProvider)
    assert (provider.kind, provider.device, provider.rank, provider.world_size) == (
        "mock",
        "mock:0",
        0,
        1,
    )


def test_every_descriptor_field_is_configurable() -> None:
    cap = MockBackendProvider(
        device_name="fake-h200",
        device_type="gpu",
        compute_capability="9.0",
        total_memory_bytes=10,
        available_memory_bytes=5,
        max_batch_size=8,
        max_sequence_length=4096,
        supported_collectives=["all_reduce"],
        supported_reduce_ops=["sum"],
        has_stream=False,
        has_event=False,
        has_kv_block_copy=False,
        has_kv_block_migrate=False,
        extra={"vendor": "none"},
    ).capability()
    assert (cap.device_name, cap.device_type, cap.compute_capability) == ("fake-h200", "gpu", "9.0")
    assert (cap.total_memory_bytes, cap.available_memory_bytes) == (10, 5)
    assert (cap.max_batch_size, cap.max_sequence_length) == (8, 4096)
    assert [c.value for c in cap.supported_collectives] == ["all_reduce"]
    assert not (cap.has_stream or cap.has_event or cap.has_kv_block_copy)
    assert cap.extra == {"vendor": "none"}


FLAG_OFF: list[tuple[str, Callable[[MockBackendProvider], object]]] = [
    ("has_stream", lambda p: p.create_stream()),
    ("has_event", lambda p: p.create_event()),
    ("has_kv_block_copy", lambda p: p.kv_block_copy(*p.kv_blocks_alloc([16, 16], DType.FP16))),
    ("has_kv_block_copy", lambda p: p.kv_blocks_copy([])),
    ("has_kv_block_migrate", lambda p: p.kv_block_migrate(p.kv_block_alloc(16, "fp16"), "host")),
    ("has_kv_block_migrate", lambda p: p.kv_blocks_migrate([], "host")),
    ("has_collective", lambda p: p.all_reduce(MockTensor([1.0], DType.FP16))),
    ("has_graph_exec", lambda p: p.capture_graph()),
]


@pytest.mark.parametrize(("flag", "call"), FLAG_OFF)
def test_an_operation_whose_capability_is_off_fails_at_once(
    flag: str, call: Callable[[MockBackendProvider], object]
) -> None:
    on = MockBackendProvider(has_graph_exec=True)
    call(on)
    off = MockBackendProvider(**{flag: False})  # type: ignore[arg-type]  # flag names are bools
    with pytest.raises(CapabilityError) as info:
        call(off)
    assert info.value.code is ErrorCode.NOT_IMPLEMENTED
    assert isinstance(info.value, NotImplementedError) and info.value.hint


def test_kernel_registry_enforces_capability_and_refuses_overwrites() -> None:
    p = MockBackendProvider()

    def add(x: float, y: float) -> float:
        return x + y

    spec = p.register_kernel(
        "add",
        add,
        kind=KernelKind.MATMUL,
        dtypes=["fp16"],
        reference=add,
        make_inputs=lambda seed, dtype: ((seed, 1.0), {}),
    )
    assert p.get_kernel("add") is add and p.kernel_spec("add") is spec
    spec.check(3, DType.FP16)
    with pytest.raises(KernelExistsError):
        p.register_kernel("add", lambda x, y: 0)
    assert p.get_kernel("add") is add
    p.register_kernel("add", lambda x, y: x - y, override=True)
    assert p.get_kernel("add")(3, 1) == 2
    with pytest.raises(CapabilityError, match="softmax"):
        p.register_kernel("sm", add, kind="softmax")
    with pytest.raises(CapabilityError, match="fp32"):
        p.register_kernel("f32", add, dtypes=["fp32"])
    with pytest.raises(KernelNotFoundError, match="registered: add") as info:
        p.get_kernel("ad")
    assert info.value.code is ErrorCode.OPERATOR_NOT_FOUND and "'add'" in (info.value.hint or "")
    assert [s.name for s in p.list_kernels()] == ["add", "sample"]
    assert p.list_kernels(KernelKind.ATTENTION) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_memory_mb": 0},
        {"max_memory_mb": True},
        {"num_devices": 0},
        {"device_index": 2},
        {"has_collective": "yes"},
        {"tokens_per_block": 0},
        {"supported_dtypes": ["fp64"]},
        {"collective_timeout": -1.0},
        {"world": object()},
    ],
)
def test_bad_constructor_arguments_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        MockBackendProvider(**kwargs)  # type: ignore[arg-type]  # deliberately bad


def test_close_releases_memory_and_refuses_later_calls() -> None:
    p = MockBackendProvider()
    p.kv_blocks_alloc([16, 32], DType.FP16)
    p.close()
    p.close()
    for call in (
        lambda: p.kv_block_alloc(16, DType.FP16),
        p.memory_stats,
        p.synchronize,
        p.create_stream,
        p.barrier,
    ):
        with pytest.raises(BackendUnavailableError, match="closed"):
            call()
    assert p.capability().device_name == "mock:0"


@dataclass
class Config:
    kind: str = "mock"
    device: str | None = None
    device_ids: list[int] | None = None


def test_create_mock_backend_is_a_factory_taking_config_and_options() -> None:
    assert isinstance(create_mock_backend, BackendFactory)
    assert create_mock_backend.kind == "mock" and create_mock_backend.priority < 0
    assert create_mock_backend().capability().supported_dtypes == (DType.FP16, DType.BF16)
    assert create_mock_backend(None).device == "mock:0"
    assert create_mock_backend(Config(device="mock:1")).device == "mock:1"
    assert create_mock_backend(Config(device="1")).device == "mock:1"
    assert create_mock_backend(Config(device_ids=[1])).device == "mock:1"
    p = create_mock_backend(
        None,
        supported_dtypes="fp32+int8",
        supported_kernels="",
        max_memory_mb="2",
        has_graph_exec="true",
        tokens_per_block=8,
        supported_reduce_ops="sum+max",
    )
    cap = p.capability()
    assert cap.supported_dtypes == (DType.FP32, DType.INT8)
    assert cap.supported_kernels == () and cap.has_graph_exec and cap.max_memory_mb == 2
    assert [r.value for r in cap.supported_reduce_ops] == ["sum", "max"]
    assert p.kv_layout.tokens_per_block == 8


@pytest.mark.parametrize(
    ("config", "options", "error"),
    [
        (None, {"max_memory": 1}, UnknownOptionError),
        (None, {"max_memory_mb": "lots"}, InvalidArgumentError),
        (None, {"supported_dtypes": "fp16,bf16"}, InvalidArgumentError),
        (Config(device="cuda:0"), {}, InvalidArgumentError),
        (Config(device="mock:5"), {}, InvalidArgumentError),
        (Config(device_ids=[0, 1]), {}, InvalidArgumentError),
    ],
)
def test_factory_refuses_bad_configs_and_options(
    config: Config | None, options: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        create_mock_backend(config, **options)
