"""The ascend backend on the torch_npu stand-in: device selection, capability from the SoC,
HCCL refusals, the event rules and stale reads without a wait (the fused kernels:
test_ascend_kernels.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytest.importorskip("torch", reason="needs torch: pip install isagellm-backend-ascend")

import torch

from sagellm_backend.dtypes import DType, ReduceOp
from sagellm_backend.errors import (
    CapabilityError,
    CommBackendNotSupportedError,
    EventStateError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend_ascend import create_ascend_backend
from sagellm_backend_ascend.runtime import NpuEvent, NpuStream

torch_npu = pytest.importorskip("torch_npu", reason="the stand-in is on sys.path (conftest)")

Provider = TorchBackendProvider[NpuStream, NpuEvent]


SMALL = {"num_blocks": 32, "host_num_blocks": 32, "pin_host_memory": False}


@dataclass(frozen=True)
class Config:
    """What sageLLM callers pass a factory: kind, device and device_ids."""

    kind: str = "ascend"
    device: str | None = None
    device_ids: tuple[int, ...] | None = None


@pytest.fixture
def backend() -> Iterator[Provider]:
    provider = create_ascend_backend(**SMALL)
    yield provider
    provider.close()


def test_explicit_index_and_aliases_select_the_npu() -> None:
    provider = create_ascend_backend(Config(kind="npu", device="npu:1"), **SMALL)
    try:
        assert provider.device == "ascend:1"
        assert provider.torch_device == torch.device("npu", 1)
        assert torch_npu.npu.current_device() == 1
    finally:
        provider.close()


def test_launcher_local_rank_binds_the_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    provider = create_ascend_backend(**SMALL)
    try:
        assert provider.device == "ascend:1"
        assert torch_npu.npu.current_device() == 1
    finally:
        provider.close()
    explicit = create_ascend_backend(Config(device="0"), **SMALL)
    try:
        assert explicit.device == "ascend:0"
        assert torch_npu.npu.current_device() == 0
    finally:
        explicit.close()


@pytest.mark.parametrize("value", ["x", "\u00b2"])  # '²'.isdigit(), but int() refuses it
def test_a_local_rank_that_is_no_index_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LOCAL_RANK", value)
    with pytest.raises(InvalidArgumentError, match="is not a device index"):
        create_ascend_backend(**SMALL)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"kv_dtype": "bf16"}, CapabilityError),
        ({"num_blocks": -1}, InvalidArgumentError),
        ({"kv_memory_mb": 0, "num_blocks": 0}, InvalidArgumentError),
        ({"num_layers": 0}, InvalidArgumentError),
    ],
)
def test_a_refused_creation_leaves_the_current_npu(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, object], error: type[Exception]
) -> None:
    monkeypatch.setenv("FAKE_TORCH_NPU_SOC", "Ascend310P3")
    torch_npu.npu.set_device(0)
    with pytest.raises(error):
        create_ascend_backend(Config(device="ascend:1"), **{**SMALL, **options})
    assert torch_npu.npu.current_device() == 0


def test_an_index_out_of_range_names_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "4,5")
    with pytest.raises(InvalidArgumentError, match=r"ascend:2 does not exist; 2 NPU\(s\)") as err:
        create_ascend_backend(Config(device="2"), **SMALL)
    assert "ASCEND_RT_VISIBLE_DEVICES='4,5'" in err.value.message


@pytest.mark.parametrize(
    ("soc", "family", "bf16", "fp8"),
    [
        ("Ascend910B3", "a2", True, False),
        ("Ascend910_9391", "a3", True, False),
        ("Ascend310P3", "310p", False, False),
        ("Ascend950PR_9599", "950", True, True),
    ],
)
def test_capability_follows_the_soc_family(
    monkeypatch: pytest.MonkeyPatch, soc: str, family: str, bf16: bool, fp8: bool
) -> None:
    monkeypatch.setenv("FAKE_TORCH_NPU_SOC", soc)
    provider = create_ascend_backend(**SMALL)
    try:
        capability = provider.capability()
        assert capability.device_name == soc
        assert capability.device_type == "npu"
        assert capability.extra["soc_family"] == family
        soc_dtypes = capability.extra["soc_dtypes"].split(",")
        assert ("bf16" in soc_dtypes, "fp8" in soc_dtypes) == (bf16, fp8)
        computed = (DType.FP32, DType.FP16, DType.BF16) if bf16 else (DType.FP32, DType.FP16)
        assert capability.supported_dtypes == computed
        assert capability.kv_dtypes == (DType.FP16,)
        for spec in provider.list_kernels():
            assert spec.dtypes <= set(computed), spec.name
        assert capability.total_memory_bytes == 1 << 30
        assert int(capability.extra["cube_cores"]) > 0
        assert capability.extra["dist_backend"] == "hccl"
    finally:
        provider.close()
    if not bf16:
        with pytest.raises(CapabilityError, match="bf16 is not supported by the 310p"):
            create_ascend_backend(kv_dtype="bf16", **SMALL)


def test_hccl_claims_only_its_reduce_ops(backend: Provider) -> None:
    assert set(backend.capability().supported_reduce_ops) == {
        ReduceOp.SUM,
        ReduceOp.PROD,
        ReduceOp.MIN,
        ReduceOp.MAX,
    }


@pytest.mark.parametrize("op", ["band", "bor", "bxor", "avg"])
def test_hccl_refuses_reduce_ops_up_front(backend: Provider, op: str) -> None:
    tensor = torch.ones(4, dtype=torch.int32, device=backend.torch_device)
    with pytest.raises(CommBackendNotSupportedError, match=f"hccl cannot reduce with {op}"):
        backend.all_reduce(tensor, op)
    assert backend.all_reduce(tensor, "sum").cpu().tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("dtype", ["complex64", "uint16", "float8_e4m3fn"])
def test_hccl_refuses_dtypes_it_lacks_up_front(backend: Provider, dtype: str) -> None:
    tensor = torch.zeros(4, dtype=getattr(torch, dtype), device=backend.torch_device)
    with pytest.raises(CommBackendNotSupportedError, match="hccl cannot all_reduce"):
        backend.all_reduce(tensor)
    with pytest.raises(CommBackendNotSupportedError):
        backend.broadcast(tensor)


def test_a_cpu_tensor_is_refused_by_collectives(backend: Provider) -> None:
    with pytest.raises(InvalidArgumentError, match="this provider's device is npu:0"):
        backend.all_reduce(torch.ones(4))


def test_elapsed_ms_applies_cudas_event_rules(backend: Provider) -> None:
    stream = backend.create_stream()
    untimed, start, end = (
        backend.create_event(False),
        backend.create_event(),
        backend.create_event(),
    )
    start.record(stream)
    with pytest.raises(EventStateError, match="the end event was never recorded"):
        end.elapsed_ms(start)
    untimed.record(stream)
    end.record(stream)
    with pytest.raises(EventStateError, match="created without timing"):
        end.elapsed_ms(untimed)
    assert end.elapsed_ms(start) >= 0.0


def test_reading_without_waiting_for_the_writing_stream_is_stale(backend: Provider) -> None:
    tokens = backend.kv_layout.tokens_per_block
    block = backend.kv_block_alloc(tokens, DType.FP16)
    size = backend.kv_layout.page_bytes(DType.FP16)
    backend.kv_block_write(block, bytes(size))
    backend.synchronize()
    writer = backend.create_stream()
    with writer:
        backend.kv_block_write(block, b"\x01" * size)
    assert backend.kv_block_read(block) == bytes(size)
    backend.current_stream().wait_stream(writer)
    assert backend.kv_block_read(block) == b"\x01" * size


def test_the_kv_pool_larger_than_the_npu_is_resource_exhausted() -> None:
    with pytest.raises(ResourceExhaustedError, match="too little free memory") as err:
        create_ascend_backend(
            num_blocks=0, kv_memory_mb=2048, host_num_blocks=8, pin_host_memory=False
        )
    assert "NPU out of memory" in err.value.message
