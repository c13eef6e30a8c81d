"""The bridge to isagellm-protocol, against the real package: round trips with nothing lost."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

import pytest

proto = pytest.importorskip(
    "sagellm_protocol",
    reason="isagellm-protocol is published for Python 3.11 only: "
    "pip install 'isagellm-backend[protocol]' on Python 3.11 to run these tests",
)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sagellm_backend import (  # noqa: E402
    BackendError,
    CapabilityDescriptor,
    CapabilityError,
    CollectiveOp,
    DType,
    ErrorCode,
    InvalidArgumentError,
    KernelKind,
    KVLayout,
    ReduceOp,
    errors,
)
from sagellm_backend.interop import (  # noqa: E402
    CLASS_FOR_CODE,
    NEAREST_CODES,
    NEAREST_PROTOCOL_CODES,
    CapabilityRemainder,
    ProtocolCapabilityDescriptor,
    capability_from_protocol,
    capability_to_protocol,
    enum_from_protocol,
    enum_to_protocol,
    error_code_from_protocol,
    error_code_to_protocol,
    error_from_protocol,
    error_to_protocol,
)
from sagellm_backend.interop.protocol import _version_problem  # noqa: E402
from sagellm_backend.kernels import KernelTable  # noqa: E402
from sagellm_backend.ops import STANDARD_OPS  # noqa: E402

OUR_ENUMS: list[type[DType] | type[KernelKind] | type[ReduceOp] | type[CollectiveOp]] = [
    DType,
    KernelKind,
    ReduceOp,
    CollectiveOp,
]
OUR_MEMBERS = [member for enum in OUR_ENUMS for member in enum]
THEIR_MEMBERS: list[Enum] = [m for enum in OUR_ENUMS for m in getattr(proto, enum.__name__)]
OUR_CODES = {c.value for c in ErrorCode}
THEIR_CODES = {c.value for c in proto.ErrorCode}
ERROR_CLASSES = [
    cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type)
    and issubclass(cls, BackendError)
    and cls is not BackendError
]
PROFILE = settings(max_examples=200, derandomize=True, deadline=None)


# Enums.


@pytest.mark.parametrize("member", OUR_MEMBERS, ids=str)
def test_every_member_of_ours_round_trips(
    member: DType | KernelKind | ReduceOp | CollectiveOp,
) -> None:
    theirs = enum_to_protocol(member)
    assert type(theirs) is getattr(proto, type(member).__name__)
    assert theirs.value == member.value
    assert enum_from_protocol(theirs) is member


@pytest.mark.parametrize("theirs", THEIR_MEMBERS, ids=repr)
def test_every_member_of_theirs_round_trips(theirs: Enum) -> None:
    ours = enum_from_protocol(theirs)
    assert type(ours).__name__ == type(theirs).__name__
    assert enum_to_protocol(ours) is theirs


@pytest.mark.parametrize("value", ["fp16", ErrorCode.UNAVAILABLE, 3])
def test_enum_to_protocol_refuses_what_is_not_one_of_our_enums(value: object) -> None:
    with pytest.raises(InvalidArgumentError, match="expected a DType"):
        enum_to_protocol(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [DType.FP16, "fp16", proto.ErrorCode.UNAVAILABLE])
def test_enum_from_protocol_refuses_what_is_not_one_of_their_enums(value: Enum) -> None:
    with pytest.raises(InvalidArgumentError, match="sagellm_protocol"):
        enum_from_protocol(value)


# Error codes.


def test_nearest_code_tables_cover_exactly_the_codes_without_a_counterpart() -> None:
    assert {c.value for c in NEAREST_PROTOCOL_CODES} == OUR_CODES - THEIR_CODES
    assert set(NEAREST_PROTOCOL_CODES.values()) <= THEIR_CODES
    assert set(NEAREST_CODES) == THEIR_CODES - OUR_CODES
    assert set(CLASS_FOR_CODE) == set(ErrorCode)


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_every_code_of_ours_converts(code: ErrorCode) -> None:
    theirs = error_code_to_protocol(code)
    assert isinstance(theirs, proto.ErrorCode)
    if code.value in THEIR_CODES:
        assert theirs.value == code.value
        assert error_code_from_protocol(theirs) is code
    else:
        assert theirs.value == NEAREST_PROTOCOL_CODES[code]
    assert error_code_to_protocol(code.value) is theirs


@pytest.mark.parametrize("theirs", list(proto.ErrorCode), ids=lambda c: c.value)
def test_every_code_of_theirs_converts(theirs: Enum) -> None:
    ours = error_code_from_protocol(theirs)
    expected = NEAREST_CODES.get(theirs.value) or ErrorCode(theirs.value)
    assert ours is expected
    assert error_code_from_protocol(theirs.value) is ours


def test_error_code_conversions_refuse_unknown_codes() -> None:
    with pytest.raises(InvalidArgumentError, match="error code"):
        error_code_to_protocol("no_such_code")
    with pytest.raises(InvalidArgumentError, match="has no value 'no_such_code'"):
        error_code_from_protocol("no_such_code")


# Errors.


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_each_error_class_is_rebuilt_from_its_own_code(cls: type[BackendError]) -> None:
    assert CLASS_FOR_CODE[cls.default_code] is cls


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_every_error_of_ours_round_trips(code: ErrorCode) -> None:
    cls = CLASS_FOR_CODE[code]
    error = cls("block 7 was freed", hint="keep the handle migrate returned", code=code)
    model = error_to_protocol(error)
    assert isinstance(model, proto.Error)
    assert model.retryable is cls.retryable
    if code.value in THEIR_CODES:
        assert model.code.value == code.value
        assert model.message == "block 7 was freed; keep the handle migrate returned"
    else:
        assert model.code.value == NEAREST_PROTOCOL_CODES[code]
        assert model.message.startswith(f"[{code.value}] block 7 was freed")
    back = error_from_protocol(model)
    assert type(back) is cls
    assert back.code is code
    assert str(back) == str(error)


@pytest.mark.parametrize("theirs", list(proto.ErrorCode), ids=lambda c: c.value)
def test_every_error_of_theirs_round_trips(theirs: Enum) -> None:
    model = proto.Error(code=theirs, message="the transfer stalled", retryable=None)
    error = error_from_protocol(model)
    code = error_code_from_protocol(theirs)
    assert type(error) is CLASS_FOR_CODE[code]
    assert error.code is code
    if theirs.value in OUR_CODES:
        assert error.message == "the transfer stalled"
    else:
        assert error.message == f"[{theirs.value}] the transfer stalled"
    again = error_to_protocol(error)
    assert (again.code, again.message) == (theirs, "the transfer stalled")


def test_protocol_errors_keep_the_builtin_a_caller_catches() -> None:
    refusal = proto.Error(code=proto.ErrorCode.NOT_IMPLEMENTED, message="no fp8")
    with pytest.raises(NotImplementedError, match="no fp8"):
        raise error_from_protocol(refusal)
    full = proto.Error(code=proto.ErrorCode.KV_PRIORITY_QUEUE_FULL, message="queue full")
    with pytest.raises(MemoryError, match=r"\[kv_priority_queue_full\] queue full"):
        raise error_from_protocol(full)


def test_a_message_that_merely_looks_like_a_carried_code_keeps_its_code_both_ways() -> None:
    for model in (
        proto.Error(code=proto.ErrorCode.UNAVAILABLE, message="[block_not_found] odd text"),
        proto.Error(code=proto.ErrorCode.INVALID_ARGUMENT, message="[invalid_operator_mapping] x"),
    ):
        error = error_from_protocol(model)
        assert error.code.value == model.code.value
        again = error_to_protocol(error)
        assert (again.code, again.message) == (model.code, model.message)
    for ours in (
        errors.InvalidArgumentError("[block_not_found] from an engine's log"),
        errors.InvalidArgumentError("[invalid_operator_mapping] x"),
    ):
        back = error_from_protocol(error_to_protocol(ours))
        assert (type(back), back.code, back.message) == (type(ours), ours.code, ours.message)


def test_error_conversions_refuse_other_objects() -> None:
    with pytest.raises(InvalidArgumentError, match="expected a BackendError"):
        error_to_protocol(ValueError("x"))  # type: ignore[arg-type]
    as_dict = {"code": "unavailable", "message": "x", "retryable": None}
    with pytest.raises(InvalidArgumentError, match=r"sagellm_protocol\.Error"):
        error_from_protocol(as_dict)  # type: ignore[arg-type]


# Capability descriptors.

names = st.none() | st.text(max_size=12)
sizes = st.none() | st.integers(min_value=0, max_value=2**48)


def members_or_values(enum: type[Enum]) -> st.SearchStrategy[list[Enum | str]]:
    one: st.SearchStrategy[Enum | str] = st.sampled_from(list(enum)) | st.sampled_from(
        [m.value for m in enum]
    )
    return st.lists(one, max_size=len(enum) + 2)


ours_descriptors = st.builds(
    CapabilityDescriptor,
    supported_dtypes=members_or_values(DType),
    supported_kernels=members_or_values(KernelKind),
    has_stream=st.booleans(),
    has_event=st.booleans(),
    has_collective=st.booleans(),
    has_graph_exec=st.booleans(),
    max_memory_mb=sizes,
    device_name=names,
    device_type=st.text(max_size=12),
    compute_capability=names,
    total_memory_bytes=sizes,
    available_memory_bytes=sizes,
    supported_collectives=members_or_values(CollectiveOp),
    supported_reduce_ops=members_or_values(ReduceOp),
    supported_ops=st.lists(st.sampled_from(list(STANDARD_OPS))),
    has_kv_block_copy=st.booleans(),
    has_kv_block_migrate=st.booleans(),
    max_batch_size=sizes,
    max_sequence_length=sizes,
    extra=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
    kv_dtypes=st.none() | members_or_values(DType),
)


def unique_members(enum_name: str, *, as_text: bool) -> st.SearchStrategy[list[object]]:
    enum = getattr(proto, enum_name)
    values = st.lists(st.sampled_from(list(enum)), unique=True)
    if not as_text:
        return values
    return values.flatmap(lambda ms: st.tuples(*(st.sampled_from([m, m.value]) for m in ms))).map(
        list
    )


@st.composite
def their_descriptors(draw: st.DrawFn) -> ProtocolCapabilityDescriptor:
    has_collective = draw(st.booleans())
    collectives = draw(unique_members("CollectiveOp", as_text=True))
    if has_collective and not collectives:
        collectives = [proto.CollectiveOp.ALL_REDUCE]
    descriptor: ProtocolCapabilityDescriptor = proto.CapabilityDescriptor(
        device_name=draw(names),
        device_type=draw(st.text(max_size=12)),
        compute_capability=draw(names),
        total_memory_bytes=draw(sizes),
        available_memory_bytes=draw(sizes),
        supported_dtypes=draw(unique_members("DType", as_text=False)),
        supported_kernels=draw(unique_members("KernelKind", as_text=False)),
        has_stream=draw(st.booleans()),
        has_event=draw(st.booleans()),
        has_collective=has_collective,
        has_graph_exec=draw(st.booleans()),
        supported_collectives=collectives,
        has_kv_block_copy=draw(st.booleans()),
        has_kv_block_migrate=draw(st.booleans()),
        max_memory_mb=draw(sizes),
        max_batch_size=draw(sizes),
        max_sequence_length=draw(sizes),
    )
    return descriptor


@PROFILE
@given(ours_descriptors)
def test_ours_to_theirs_and_back_loses_nothing(capability: CapabilityDescriptor) -> None:
    descriptor, remainder = capability_to_protocol(capability)
    assert isinstance(descriptor, proto.CapabilityDescriptor)
    assert remainder.supported_reduce_ops == capability.supported_reduce_ops
    assert remainder.extra == capability.extra
    assert remainder.supported_ops == capability.supported_ops
    if capability.kv_dtypes != capability.supported_dtypes:
        assert remainder.kv_dtypes == capability.kv_dtypes
    assert capability_from_protocol(descriptor, remainder) == capability
    shipped = CapabilityRemainder.from_dict(json.loads(json.dumps(remainder.to_dict())))
    assert shipped == remainder
    assert hash(shipped) == hash(remainder)
    assert capability_from_protocol(descriptor, shipped) == capability


@PROFILE
@given(their_descriptors())
def test_theirs_to_ours_and_back_loses_nothing(descriptor: ProtocolCapabilityDescriptor) -> None:
    capability = capability_from_protocol(descriptor)
    again, remainder = capability_to_protocol(capability)
    assert again == descriptor
    assert capability_from_protocol(again, remainder) == capability


@PROFILE
@given(ours_descriptors)
def test_both_descriptors_answer_queries_alike(capability: CapabilityDescriptor) -> None:
    descriptor = capability_to_protocol(capability).descriptor
    for dtype in DType:
        assert descriptor.supports_dtype(enum_to_protocol(dtype)) == capability.supports_dtype(
            dtype
        )
        if not capability.supports_dtype(dtype):
            with pytest.raises(NotImplementedError):
                descriptor.require_dtype(enum_to_protocol(dtype))
            with pytest.raises(NotImplementedError):
                capability.require_dtype(dtype)
    for kind in KernelKind:
        assert descriptor.supports_kernel(enum_to_protocol(kind)) == capability.supports_kernel(
            kind
        )
    if capability.has_collective or not capability.supported_collectives:
        for op in CollectiveOp:
            theirs = descriptor.supports_collective(enum_to_protocol(op))
            assert theirs == capability.supports_collective(op)
    if not capability.has_graph_exec:
        with pytest.raises(NotImplementedError):
            descriptor.require_graph_exec()


def test_without_a_remainder_the_defaults_of_ours_apply() -> None:
    descriptor = proto.CapabilityDescriptor(
        has_collective=True, supported_collectives=["all_reduce", "all_reduce"]
    )
    capability = capability_from_protocol(descriptor)
    assert capability.supported_collectives == (CollectiveOp.ALL_REDUCE,)
    assert capability.supported_reduce_ops == tuple(ReduceOp)
    assert capability.extra == {}
    assert capability.supported_ops == ()
    assert capability.kv_dtypes == capability.supported_dtypes


def test_collectives_claimed_without_a_list_are_refused() -> None:
    descriptor = proto.CapabilityDescriptor(has_collective=True)
    with pytest.raises(InvalidArgumentError, match="lists no supported_collectives") as info:
        capability_from_protocol(descriptor)
    assert info.value.hint == "list the supported collectives, or set has_collective=False"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("supported_collectives", ["all_to_some"], "unknown supported_collective 'all_to_some'"),
        ("supported_dtypes", ["fp64"], "unknown supported_dtype 'fp64'"),
        ("has_stream", "yes", "has_stream must be a bool"),
        ("supported_kernels", "matmul", "supported_kernels must be a list"),
        ("max_batch_size", -1, "max_batch_size must be a non-negative int"),
    ],
)
def test_malformed_protocol_descriptors_are_refused(
    field: str, value: object, message: str
) -> None:
    descriptor = proto.CapabilityDescriptor()
    setattr(descriptor, field, value)
    with pytest.raises(InvalidArgumentError, match=message):
        capability_from_protocol(descriptor)


def test_capability_conversions_refuse_other_objects() -> None:
    with pytest.raises(InvalidArgumentError, match="expected a CapabilityDescriptor"):
        capability_to_protocol(proto.CapabilityDescriptor())
    with pytest.raises(InvalidArgumentError, match=r"sagellm_protocol\.CapabilityDescriptor"):
        capability_from_protocol(CapabilityDescriptor())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="remainder must be a CapabilityRemainder"):
        capability_from_protocol(proto.CapabilityDescriptor(), {"extra": {}})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"supported_reduce_ops": ["median"]}, "unknown reduce op 'median'"),
        ({"supported_reduce_ops": "sum"}, "must be a sequence"),
        ({"extra": {"a": 1}}, "extra must be a mapping of str to str"),
        ({"supported_ops": ["rms_norm", "fused_rope"]}, "unknown standard ops \\['fused_rope'\\]"),
        ({"supported_ops": "rms_norm"}, "supported_ops must be a sequence"),
        ({"kv_dtypes": "fp16"}, "kv_dtypes must be a sequence"),
        ({"kv_dtypes": ["fp64"]}, "unknown kv dtype 'fp64'"),
    ],
)
def test_malformed_remainders_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        CapabilityRemainder(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="unknown capability remainder fields"):
        CapabilityRemainder.from_dict({"supported_reduce_ops": [], "colour": "red"})


def test_a_protocol_release_without_a_field_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass
    class OlderDescriptor:
        device_name: str | None = None
        supported_dtypes: list[object] = dataclasses.field(default_factory=list)

    monkeypatch.setattr(proto, "CapabilityDescriptor", OlderDescriptor)
    with pytest.raises(CapabilityError, match=r"lacks the fields \['available_memory_bytes'"):
        capability_to_protocol(CapabilityDescriptor())
    with pytest.raises(CapabilityError, match="lacks the fields"):
        capability_from_protocol(OlderDescriptor())  # type: ignore[arg-type]


@pytest.fixture
def fresh_version_check() -> Iterator[None]:
    _version_problem.cache_clear()
    yield
    _version_problem.cache_clear()


@pytest.mark.usefixtures("fresh_version_check")
def test_an_unsupported_protocol_release_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = tmp_path / "isagellm_protocol-0.6.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: isagellm-protocol\nVersion: 0.6.1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CapabilityError, match=r"isagellm-protocol 0\.6\.1 is installed") as raised:
        enum_to_protocol(DType.FP16)
    assert raised.value.hint == "pip install 'isagellm-protocol>=0.5.4,<0.6'"


# Their members are accepted wherever ours are.


def test_descriptor_takes_their_members() -> None:
    capability = CapabilityDescriptor(
        supported_dtypes=[proto.DType.FP16, proto.DType.BF16],
        supported_kernels=[proto.KernelKind.ATTENTION],
        has_collective=True,
        supported_collectives=[proto.CollectiveOp.ALL_REDUCE],
        supported_reduce_ops=[proto.ReduceOp.MAX],
    )
    assert capability.supported_dtypes == (DType.FP16, DType.BF16)
    assert capability.supported_reduce_ops == (ReduceOp.MAX,)
    assert capability.require_dtype(proto.DType.BF16) is DType.BF16
    assert capability.supports_kernel(proto.KernelKind.ATTENTION)
    assert capability.require_collective(proto.CollectiveOp.ALL_REDUCE) is CollectiveOp.ALL_REDUCE
    assert capability.require_reduce_op(proto.ReduceOp.MAX) is ReduceOp.MAX
    with pytest.raises(CapabilityError):
        capability.require_dtype(proto.DType.FP8)


def test_kernel_table_and_kv_layout_take_their_members() -> None:
    table = KernelTable()
    spec = table.register(
        "rms_norm",
        lambda x: x,
        kind=proto.KernelKind.LAYERNORM,
        dtypes=[proto.DType.FP16, proto.DType.FP32],
    )
    assert spec.kind is KernelKind.LAYERNORM
    assert spec.dtypes == frozenset({DType.FP16, DType.FP32})
    assert table.list(proto.KernelKind.LAYERNORM) == [spec]
    layout = KVLayout(dtype=proto.DType.BF16)
    assert layout.dtype is DType.BF16
    assert layout.page_bytes(proto.DType.FP32) == 2 * layout.page_bytes(DType.FP16)


def test_mock_provider_takes_their_members() -> None:
    mock = pytest.importorskip("sagellm_backend.mock")
    backend = mock.MockBackendProvider(supported_dtypes=[proto.DType.FP16])
    block = backend.kv_block_alloc(40, proto.DType.FP16)
    info = backend.kv_block_info(block)
    assert info.dtype is DType.FP16
    assert info.num_pages == 3
    assert backend.kv_block_grow(block, 64) == block
    assert backend.kv_block_info(block).num_pages == 4
    spec = backend.register_kernel(
        "scale", lambda x: x, kind=proto.KernelKind.MATMUL, dtypes=[proto.DType.FP16]
    )
    assert spec.kind is KernelKind.MATMUL
    backend.kv_block_free(block)
    backend.close()


def test_mock_all_reduce_takes_their_reduce_op() -> None:
    mock = pytest.importorskip("sagellm_backend.mock")
    ranks = mock.create_mock_world(2, collective_timeout=10.0)
    outcomes: dict[int, object] = {}

    def run(rank: int) -> None:
        tensor = mock.MockTensor([rank + 1.0, 10.0 * (rank + 1)], DType.FP16)
        try:
            outcomes[rank] = ranks[rank].all_reduce(tensor, proto.ReduceOp.MAX).tolist()
        except BackendError as exc:
            outcomes[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == {0: [2.0, 20.0], 1: [2.0, 20.0]}
    for provider in ranks:
        provider.close()
