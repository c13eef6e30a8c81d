"""Value types: enums, capability descriptor, KV layout and handles, device references."""

from __future__ import annotations

import copy
import json
import pickle
from typing import Any

import pytest

import sagellm_backend
from sagellm_backend import (
    CapabilityDescriptor,
    CapabilityError,
    CollectiveOp,
    DeviceRef,
    DType,
    ErrorCode,
    InvalidArgumentError,
    KernelKind,
    KVBlock,
    KVBlockInfo,
    KVLayout,
    MockBackendProvider,
    ReduceOp,
)
from sagellm_backend.dtypes import coerce


def test_enum_values_are_the_wire_strings() -> None:
    assert [d.value for d in DType] == ["fp32", "fp16", "bf16", "fp8", "int8", "int4"]
    assert [k.value for k in KernelKind] == [
        "matmul", "attention", "fusion", "layernorm", "softmax",
    ]  # fmt: skip
    assert [r.value for r in ReduceOp] == [
        "sum", "max", "min", "prod", "band", "bor", "bxor", "avg",
    ]  # fmt: skip
    assert [c.value for c in CollectiveOp][:3] == ["all_reduce", "all_gather", "reduce_scatter"]


@pytest.mark.parametrize("enum", [DType, KernelKind, ReduceOp, CollectiveOp])
def test_coerce_accepts_members_and_their_strings(enum: type[DType]) -> None:
    for member in enum:
        assert coerce(enum, member) is member
        assert coerce(enum, member.value) is member
        assert coerce(enum, member.value.upper()) is member


def test_coerce_accepts_a_member_of_another_enum_with_the_same_value() -> None:
    from enum import Enum

    class TheirDType(str, Enum):
        BF16 = "bf16"

    assert coerce(DType, TheirDType.BF16) is DType.BF16


@pytest.mark.parametrize("bad", ["fp64", "", 3, None, b"fp16"])
def test_coerce_refuses_unknown_values_with_the_choices(bad: object) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        coerce(DType, bad, "dtype")
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert "'fp16'" in str(info.value)


def test_dtype_widths() -> None:
    assert {d: d.bits for d in DType} == {
        DType.FP32: 32, DType.FP16: 16, DType.BF16: 16, DType.FP8: 8, DType.INT8: 8, DType.INT4: 4,
    }  # fmt: skip


def test_descriptor_from_the_seed_keywords_alone() -> None:
    cap = CapabilityDescriptor(
        supported_dtypes=[DType.FP16, DType.BF16],
        supported_kernels=[KernelKind.MATMUL],
        has_stream=True,
        has_event=True,
        has_collective=True,
        has_graph_exec=False,
        max_memory_mb=1024,
    )
    assert cap.supported_dtypes == (DType.FP16, DType.BF16)
    assert cap.supports_collective("all_reduce")
    assert cap.supports_reduce_op(ReduceOp.BXOR)


def test_descriptor_is_immutable_and_hashable() -> None:
    cap = CapabilityDescriptor(supported_dtypes=["fp16"])
    with pytest.raises(AttributeError):
        cap.has_stream = False  # type: ignore[misc]
    assert hash(cap) == hash(CapabilityDescriptor(supported_dtypes=[DType.FP16]))
    assert cap.replace(has_stream=False).has_stream is False
    assert cap.has_stream is True


def test_descriptor_round_trips_through_dict_json_and_pickle() -> None:
    cap = CapabilityDescriptor(
        supported_dtypes=["fp16", "bf16", "fp8"],
        supported_kernels=["attention"],
        has_collective=True,
        supported_collectives=["all_reduce", "all_gather"],
        supported_reduce_ops=["sum", "max"],
        device_name="H200",
        device_type="cuda",
        compute_capability="9.0",
        total_memory_bytes=150_000_000_000,
        available_memory_bytes=140_000_000_000,
        max_batch_size=256,
        max_sequence_length=8192,
        extra={"driver": "580"},
    )
    data = cap.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["supported_dtypes"] == ["fp16", "bf16", "fp8"]
    assert CapabilityDescriptor.from_dict(data) == cap
    assert CapabilityDescriptor.from_json(cap.to_json()) == cap
    assert pickle.loads(pickle.dumps(cap)) == cap


def test_descriptor_queries_refuse_with_capability_errors() -> None:
    cap = CapabilityDescriptor(supported_dtypes=["fp16"], has_collective=False)
    assert cap.require_dtype("fp16") is DType.FP16
    with pytest.raises(CapabilityError) as info:
        cap.require_dtype(DType.BF16, "kv_block_alloc")
    assert isinstance(info.value, NotImplementedError)
    assert "kv_block_alloc" in str(info.value) and "fp16" in str(info.value)
    with pytest.raises(InvalidArgumentError):
        cap.require_dtype("fp64")
    with pytest.raises(CapabilityError):
        cap.require_collective("all_reduce")
    with pytest.raises(CapabilityError):
        cap.require_graph_exec()
    with pytest.raises(CapabilityError):
        cap.require_kernel("matmul")


@pytest.mark.parametrize(
    "changes",
    [
        {"supported_dtypes": "fp16"},
        {"supported_dtypes": ["fp64"]},
        {"max_memory_mb": -1},
        {"total_memory_bytes": 1.5},
        {"max_batch_size": True},
    ],
)
def test_descriptor_validates_fields(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        CapabilityDescriptor(**changes)  # type: ignore[arg-type]


def test_extra_is_read_only_so_a_capability_never_changes() -> None:
    p = MockBackendProvider(extra={"driver": "580"})
    cap = p.capability()
    before = (cap.to_json(), hash(cap))
    with pytest.raises(TypeError):
        cap.extra["x"] = "y"  # type: ignore[index]  # the mapping is read-only
    with pytest.raises(TypeError):
        del cap.extra["driver"]  # type: ignore[attr-defined]
    source = {"a": "1"}
    copied = CapabilityDescriptor(extra=source)
    source["a"] = "2"
    assert copied.extra == {"a": "1"}
    assert (p.capability().to_json(), hash(p.capability())) == before
    assert p.capability().extra == {"driver": "580"}
    assert pickle.loads(pickle.dumps(cap)) == cap
    assert copy.deepcopy(cap) == cap and hash(copy.copy(cap)) == before[1]
    assert cap.replace(has_graph_exec=True).extra == {"driver": "580"}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"has_collective": "no"}', "has_collective must be a bool"),
        ('{"has_stream": 1}', "has_stream must be a bool"),
        ('{"has_kv_block_copy": null}', "has_kv_block_copy must be a bool"),
        ('{"extra": [1, 2]}', "extra must be a mapping of str to str"),
        ('{"extra": {"a": 1}}', "extra must be a mapping of str to str"),
        ('{"extra": "x"}', "extra must be a mapping of str to str"),
        ('{"device_type": 3}', "device_type must be a string"),
        ('{"device_type": null}', "device_type must be a string"),
        ('{"device_name": ["a"]}', "device_name must be a string or None"),
        ('{"compute_capability": 9.0}', "compute_capability must be a string or None"),
        ('{"supported_dtypes": {"fp16": 1}}', "supported_dtypes must be a sequence"),
        ('{"kv_dtypes": "fp16"}', "kv_dtypes must be a sequence"),
        ('{"kv_dtypes": [null]}', "unknown kv_dtype None"),
        ('{"supported_kernels": [1]}', "unknown supported_kernel 1"),
        ('{"max_memory_mb": "64"}', "max_memory_mb must be a non-negative int"),
        ('"capability"', "capability JSON must be an object"),
    ],
)
def test_from_json_checks_every_field_type(text: str, field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=field) as info:
        CapabilityDescriptor.from_json(text)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.hint
    data = json.loads(text)
    if isinstance(data, dict):
        with pytest.raises(InvalidArgumentError, match=field):
            CapabilityDescriptor.from_dict(data)


def test_kv_dtypes_default_to_the_compute_dtypes_and_round_trip() -> None:
    seed = CapabilityDescriptor(supported_dtypes=[DType.FP16, DType.BF16])
    assert seed.kv_dtypes == (DType.FP16, DType.BF16)
    assert seed.require_kv_dtype("bf16") is DType.BF16
    split = CapabilityDescriptor(supported_dtypes=["fp32", "fp16", "bf16"], kv_dtypes=["fp16"])
    assert split.supports_dtype("fp32") and not split.supports_kv_dtype("fp32")
    with pytest.raises(CapabilityError, match="kv_dtypes: fp16") as info:
        split.require_kv_dtype(DType.FP32, "kv_block_alloc")
    assert "kv_block_alloc" in str(info.value)
    assert split.require_dtypes(["fp32", DType.BF16]) == (DType.FP32, DType.BF16)
    assert split.require_dtypes("fp16") == (DType.FP16,)
    with pytest.raises(CapabilityError, match="int8"):
        split.require_dtypes(["fp32", "int8"], "kernel 'k'")
    with pytest.raises(InvalidArgumentError, match="dtypes must be a sequence"):
        split.require_dtypes(3, "kernel 'k'")  # type: ignore[arg-type]  # bad on purpose
    data = split.to_dict()
    assert data["kv_dtypes"] == ["fp16"]
    assert CapabilityDescriptor.from_dict(data) == split
    assert CapabilityDescriptor.from_json(split.to_json()) == split
    assert split != split.replace(kv_dtypes=["fp16", "bf16"])
    del data["kv_dtypes"]
    assert CapabilityDescriptor.from_dict(data).kv_dtypes == split.supported_dtypes


def test_descriptor_from_dict_refuses_unknown_fields_and_bad_json() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown capability fields"):
        CapabilityDescriptor.from_dict({"has_warp_drive": True})
    with pytest.raises(InvalidArgumentError, match="must be a mapping of field names"):
        CapabilityDescriptor.from_dict([("has_stream", True)])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        CapabilityDescriptor.from_json("{not json")
    with pytest.raises(InvalidArgumentError):
        CapabilityDescriptor.from_json("[1, 2]")


def test_kv_layout_sizes() -> None:
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_size=128, tokens_per_block=16)
    assert layout.page_bytes(DType.BF16) == 2 * 1024 * 1024
    assert layout.page_bytes("int4") == layout.page_bytes("int8") // 2
    assert [layout.pages_for(n) for n in (1, 16, 17, 128)] == [1, 1, 2, 8]


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_size", "tokens_per_block"])
@pytest.mark.parametrize("value", [0, -1, 1.0, True])
def test_kv_layout_validates(field: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        KVLayout(**{field: value})  # type: ignore[arg-type]


def test_kv_block_is_a_picklable_int_handle() -> None:
    block = KVBlock(0x1234 << 48 | 7)
    assert type(block) is int, "a handle is a plain int at run time"
    assert pickle.loads(pickle.dumps(block)) == block
    assert copy.deepcopy(block) == block and len({block, KVBlock(0x1234 << 48 | 7)}) == 1
    assert f"{block:#x}" == "0x1234000000000007"
    for field in ("handle", "pages", "num_tokens", "dtype", "device", "owner", "num_pages"):
        assert not hasattr(block, field), f"{field} is kv_block_info's, not the handle's"


def test_kv_block_info_is_a_picklable_value() -> None:
    info = KVBlockInfo(KVBlock(7), "mock:0", DType.FP16, (4, 9, 2))
    assert info.num_pages == 3 and info.block == 7
    assert pickle.loads(pickle.dumps(info)) == info
    assert len({info, KVBlockInfo(KVBlock(7), "mock:0", DType.FP16, (4, 9, 2))}) == 1
    assert info != info._replace(pages=(4, 9))
    assert sagellm_backend.KVBlockInfo is KVBlockInfo


def test_kv_block_info_says_where_a_mock_block_is() -> None:
    p = MockBackendProvider(tokens_per_block=16)
    block = p.kv_block_alloc(33, "bf16")
    info = p.kv_block_info(block)
    assert info == KVBlockInfo(block, "mock:0", DType.BF16, info.pages)
    assert info.num_pages == 3 and len(set(info.pages)) == 3
    assert pickle.loads(pickle.dumps(info)) == info
    p.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cuda:0", DeviceRef("cuda", 0)),
        ("host", DeviceRef("host")),
        ("npu:12", DeviceRef("npu", 12)),
    ],
)
def test_device_ref_parses(text: str, expected: DeviceRef) -> None:
    assert DeviceRef.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text",
    ["", "cuda:", ":0", "cuda:-1", "cuda:x", "CUDA 0", None, 3,
     "host\n", "cuda:0\n", "mock:\u0661", "cuda:\uff11", "h\u0661"],
)  # fmt: skip
def test_device_ref_refuses_malformed_names(text: object) -> None:
    with pytest.raises(InvalidArgumentError, match="malformed device"):
        DeviceRef.parse(text)


STATS_FIELDS = {
    "total_bytes": 10,
    "used_bytes": 4,
    "peak_used_bytes": 6,
    "kv_blocks_in_use": 1,
    "kv_pages_in_use": 2,
    "kv_pages_total": None,
}
"""The fields of ``MemoryStats(10, 4, 6, 1, 2)``."""


def test_value_types_behave_as_frozen_dataclasses() -> None:
    import dataclasses

    from sagellm_backend import MemoryStats
    from sagellm_backend.registry import BackendRecord, RecordSource, RecordStatus

    layout = KVLayout(num_layers=3, dtype=DType.FP16)
    assert dataclasses.is_dataclass(layout)
    assert [f.name for f in dataclasses.fields(KVLayout)] == [
        "num_layers",
        "num_kv_heads",
        "head_size",
        "tokens_per_block",
        "dtype",
    ]
    assert dataclasses.asdict(layout)["dtype"] is DType.FP16
    changed = dataclasses.replace(layout, head_size=32)
    assert changed == KVLayout(3, 2, 32, 16, DType.FP16) and changed != layout
    assert hash(changed) == hash(KVLayout(3, 2, 32, 16, DType.FP16))
    assert repr(layout) == (
        "KVLayout(num_layers=3, num_kv_heads=2, head_size=64, tokens_per_block=16, "
        "dtype=<DType.FP16: 'fp16'>)"
    )
    with pytest.raises(InvalidArgumentError):
        dataclasses.replace(layout, head_size=0)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'head_size'"):
        layout.head_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete field 'dtype'"):
        del layout.dtype
    assert pickle.loads(pickle.dumps(layout)) == layout and copy.deepcopy(layout) == layout
    match DeviceRef.parse("cuda:3"):
        case DeviceRef(kind, index):
            assert (kind, index) == ("cuda", 3)
    stats = MemoryStats(10, 4, 6, 1, 2)
    assert dataclasses.asdict(stats) == STATS_FIELDS
    record = BackendRecord("mock", RecordStatus.FOUND, RecordSource.BUILTIN)
    assert record.to_dict()["status"] == "found" and record != dataclasses.replace(record, kind="x")
    assert KVLayout(3) != (3, 2, 64, 16, None)


class _Written:
    """DeviceRef's constructor written out: the reference for the errors of a wrong call."""

    def __init__(self, kind: str, index: int | None = None) -> None:
        del kind, index


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        ((), {"index": 1}),
        (("cuda", 0, 1), {}),
        (("cuda",), {"kind": "cpu"}),
        (("cuda",), {"ordinal": 0}),
        ((), {"kind": "cuda", "ordinal": 0}),
    ],
)
def test_value_type_constructors_refuse_wrong_calls_as_python_does(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    with pytest.raises(TypeError) as written:
        _Written(*args, **kwargs)
    with pytest.raises(TypeError) as generated:
        DeviceRef(*args, **kwargs)
    assert str(generated.value) == str(written.value).replace("_Written", "DeviceRef")


def test_value_type_constructors_bind_fields_in_order_with_defaults() -> None:
    from sagellm_backend import MemoryStats

    stats = MemoryStats(10, 4, kv_pages_in_use=2, kv_blocks_in_use=1, peak_used_bytes=6)
    assert vars(stats) == STATS_FIELDS
    assert stats == MemoryStats(10, 4, 6, 1, 2) == MemoryStats(10, 4, 6, 1, 2, None)
    with pytest.raises(TypeError, match=r"missing 4 required positional arguments: 'used_bytes', "):
        MemoryStats(10)  # type: ignore[call-arg]
    with pytest.raises(InvalidArgumentError, match="head_size must be a positive int"):
        KVLayout(head_size=0)


def test_frozen_refuses_what_a_dataclass_refuses() -> None:
    from sagellm_backend.frozen import Frozen

    with pytest.raises(ValueError, match="mutable default <class 'list'> for field pages"):

        class Shared(Frozen):
            pages: list[int] = []  # noqa: RUF012

    with pytest.raises(TypeError, match="non-default argument 'size' follows default argument"):

        class Misordered(Frozen):
            name: str = ""
            size: int  # type: ignore[misc]
