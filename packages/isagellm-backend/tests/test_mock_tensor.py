"""MockTensor: values exactly representable per dtype, byte encoding, collective helpers."""

from __future__ import annotations

import math

import pytest

from sagellm_backend import DType, InvalidArgumentError, MockTensor


@pytest.mark.parametrize(
    ("dtype", "value", "stored"),
    [
        (DType.FP32, 0.1, 0.10000000149011612),
        (DType.FP16, 0.1, 0.0999755859375),
        (DType.FP16, 70000.0, math.inf),
        (DType.BF16, 1.00390625, 1.0),  # halfway between 1 and the next bf16: ties to even
        (DType.BF16, 1.01171875, 1.015625),
        (DType.FP8, 0.3, 0.3125),
        (DType.FP8, 448.0, 448.0),
        (DType.FP8, -17.0, -16.0),  # halfway between 16 and 18: ties to the even code
    ],
)
def test_float_values_are_rounded_to_the_dtype(dtype: DType, value: float, stored: float) -> None:
    assert MockTensor([value], dtype).tolist() == [stored]


@pytest.mark.parametrize("dtype", list(DType))
@pytest.mark.parametrize("bad", [10**400, -(10**400)])
def test_an_int_beyond_every_float_is_refused_not_overflowed(dtype: DType, bad: int) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        MockTensor([1, bad], dtype)
    assert info.value.hint
    assert MockTensor([2**40], DType.FP32).tolist() == [float(2**40)]


def test_fp8_beyond_its_range_is_nan_as_e4m3fn() -> None:
    assert math.isnan(MockTensor([1000.0], DType.FP8).tolist()[0])


@pytest.mark.parametrize(
    ("dtype", "bad"), [(DType.INT8, 128), (DType.INT8, 1.5), (DType.INT4, -9), (DType.INT4, 8)]
)
def test_integers_outside_the_dtype_are_refused(dtype: DType, bad: float) -> None:
    with pytest.raises(InvalidArgumentError, match=f"not a {dtype.value} value"):
        MockTensor([bad], dtype)


def test_wrapping_stores_computed_integers_as_the_device_does() -> None:
    assert MockTensor.wrapping([127 + 1, -129, 300], DType.INT8).tolist() == [-128, 127, 44]
    assert MockTensor.wrapping([8, -9], DType.INT4).tolist() == [-8, 7]


@pytest.mark.parametrize("dtype", list(DType))
def test_bytes_round_trip_for_every_dtype(dtype: DType) -> None:
    values = [0, 1, -2, 3, -4, 5, 7] if not dtype.is_floating_point else [0.5, -1.25, 3.0, 96.0]
    tensor = MockTensor(values, dtype)
    data = tensor.to_bytes()
    assert len(data) == tensor.nbytes == (len(values) * dtype.bits + 7) // 8
    assert MockTensor.from_bytes(data, dtype, numel=len(values)) == tensor


def test_known_encodings() -> None:
    assert MockTensor([1.0], DType.FP16).to_bytes() == b"\x00\x3c"
    assert MockTensor([1.0], DType.BF16).to_bytes() == b"\x80\x3f"
    assert MockTensor([1.0], DType.FP8).to_bytes() == b"\x38"
    assert MockTensor([1, -1, 2], DType.INT4).to_bytes() == b"\xf1\x02"


def test_from_bytes_refuses_a_wrong_length() -> None:
    with pytest.raises(InvalidArgumentError, match="do not hold"):
        MockTensor.from_bytes(b"\x00\x00\x00", DType.FP16, numel=2)


def test_equality_clone_copy_cat_chunk() -> None:
    a = MockTensor([1, 2, 3, 4], "fp32")
    assert a == MockTensor([1.0, 2.0, 3.0, 4.0], DType.FP32)
    assert a != MockTensor([1, 2, 3, 4], DType.FP16)
    b = a.clone()
    b.copy_(MockTensor([4, 3, 2, 1], DType.FP32))
    assert a.tolist() == [1, 2, 3, 4] and b.tolist() == [4, 3, 2, 1]
    assert MockTensor.cat([a, b]).shape == (8,)
    assert [t.tolist() for t in a.chunk(2)] == [[1, 2], [3, 4]]
    with pytest.raises(InvalidArgumentError, match="equal parts"):
        a.chunk(3)
    with pytest.raises(InvalidArgumentError, match="same dtype and shape"):
        a.copy_(MockTensor([1, 2], DType.FP32))


def test_non_numbers_and_unknown_dtypes_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="numbers"):
        MockTensor([1, "2"], DType.FP32)  # type: ignore[list-item]  # deliberately wrong type
    with pytest.raises(InvalidArgumentError, match="unknown dtype"):
        MockTensor([1], "fp64")
