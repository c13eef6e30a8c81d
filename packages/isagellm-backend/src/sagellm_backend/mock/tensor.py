"""MockTensor: the mock backend's tensor type, a 1-D buffer of numbers in one DType.

Every value a MockTensor holds is exactly representable in its dtype, as on a device: floats are
rounded to the nearest representable value when stored (fp8 is the e4m3fn format, as
``torch.float8_e4m3fn``), integers must lie in the dtype's range. Results computed by the device
(collectives) are stored the way the device stores them: rounded, and integers wrapping around.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Iterable, Sequence
from functools import lru_cache

from sagellm_backend.dtypes import DType, coerce
from sagellm_backend.errors import InvalidArgumentError

__all__ = ["MockTensor"]

_INT_RANGE = {DType.INT8: (-128, 127), DType.INT4: (-8, 7)}


class MockTensor:
    """A mutable 1-D tensor of ``dtype`` values, comparable with ``==`` and convertible to bytes."""

    __slots__ = ("_dtype", "_values")

    def __init__(self, values: Iterable[float], dtype: DType | str = DType.FP32) -> None:
        member = coerce(DType, dtype, "dtype")
        self._dtype = member
        self._values = [_store(member, v) for v in _numbers(values)]

    @classmethod
    def zeros(cls, numel: int, dtype: DType | str = DType.FP32) -> MockTensor:
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise InvalidArgumentError(
                f"numel must be a non-negative int, got {numel!r}",
                hint="pass the element count as an int, e.g. zeros(8)",
            )
        return cls([0] * numel, dtype)

    @classmethod
    def wrapping(cls, values: Iterable[float], dtype: DType | str) -> MockTensor:
        """A tensor of computed ``values``: integers wrap around into the dtype's range."""
        member = coerce(DType, dtype, "dtype")
        return cls((_wrap(member, v) for v in _numbers(values)), member)

    @classmethod
    def from_bytes(cls, data: bytes, dtype: DType | str, numel: int | None = None) -> MockTensor:
        """Inverse of :meth:`to_bytes`. ``numel`` is needed only for int4 with an odd count."""
        member = coerce(DType, dtype, "dtype")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(
                f"data must be bytes, got {type(data).__name__}",
                hint="pass the bytes to_bytes() returned",
            )
        raw = bytes(data)
        count = _numel_of(member, len(raw)) if numel is None else numel
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidArgumentError(
                f"numel must be a non-negative int, got {count!r}",
                hint="pass numel=tensor.numel() of the tensor the bytes came from, or leave it out",
            )
        if _nbytes(member, count) != len(raw):
            raise InvalidArgumentError(
                f"{len(raw)} bytes do not hold {count} {member.value} values",
                hint=f"pass exactly {_nbytes(member, count)} bytes",
            )
        tensor = cls((), member)
        tensor._values = _decode(member, raw, count)
        return tensor

    @property
    def dtype(self) -> DType:
        return self._dtype

    @property
    def shape(self) -> tuple[int]:
        return (len(self._values),)

    def numel(self) -> int:
        return len(self._values)

    @property
    def nbytes(self) -> int:
        return _nbytes(self._dtype, len(self._values))

    def tolist(self) -> list[float]:
        return list(self._values)

    def to_bytes(self) -> bytes:
        """Little-endian encoding in the dtype's width (int4: two values per byte, low first)."""
        return _encode(self._dtype, self._values)

    def clone(self) -> MockTensor:
        out = MockTensor((), self._dtype)
        out._values = list(self._values)
        return out

    def assign_(self, values: Iterable[float]) -> MockTensor:
        """Replace the contents with ``values`` (any count), each stored in this dtype; returns
        self. Device work that fills a buffer of the mock uses it."""
        self._values = [_store(self._dtype, v) for v in _numbers(values)]
        return self

    def copy_(self, src: MockTensor) -> MockTensor:
        """Overwrite this tensor with ``src`` (same dtype and shape); returns self."""
        if not isinstance(src, MockTensor):
            raise InvalidArgumentError(
                f"src must be a MockTensor, got {type(src).__name__}",
                hint="wrap the values first: MockTensor(values, dtype)",
            )
        if src.dtype != self._dtype or src.shape != self.shape:
            raise InvalidArgumentError(
                f"cannot copy a {src.dtype.value}{list(src.shape)} tensor into a "
                f"{self._dtype.value}{list(self.shape)} tensor",
                hint="copy between tensors of the same dtype and shape",
            )
        self._values = list(src._values)
        return self

    @staticmethod
    def cat(tensors: Sequence[MockTensor]) -> MockTensor:
        """Concatenation of tensors of one dtype."""
        if not tensors:
            raise InvalidArgumentError(
                "cat needs at least one tensor", hint="pass a non-empty list of MockTensors"
            )
        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            raise InvalidArgumentError(
                f"cat needs tensors of one dtype, got {sorted({t.dtype.value for t in tensors})}",
                hint="convert the tensors to one dtype before cat",
            )
        out = MockTensor((), dtype)
        out._values = [v for t in tensors for v in t._values]
        return out

    def chunk(self, parts: int) -> list[MockTensor]:
        """``parts`` equal consecutive pieces; the length must divide evenly."""
        if isinstance(parts, bool) or not isinstance(parts, int) or parts <= 0:
            raise InvalidArgumentError(
                f"parts must be a positive int, got {parts!r}",
                hint="pass parts as an int of at least 1",
            )
        size, rest = divmod(len(self._values), parts)
        if rest:
            raise InvalidArgumentError(
                f"a tensor of {len(self._values)} elements does not split into {parts} equal parts",
                hint=f"pass a parts that divides {len(self._values)}",
            )
        out = []
        for i in range(parts):
            piece = MockTensor((), self._dtype)
            piece._values = self._values[i * size : (i + 1) * size]
            out.append(piece)
        return out

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MockTensor):
            return NotImplemented
        return self._dtype == other._dtype and self._values == other._values

    def __repr__(self) -> str:
        return f"MockTensor({self._values!r}, dtype={self._dtype.value!r})"


def _numbers(values: Iterable[float]) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidArgumentError(
            f"values must be an iterable of numbers, got {type(values).__name__}",
            hint="pass a list such as [1.0, 2.0]",
        )
    out = list(values)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidArgumentError(
                f"tensor values must be numbers, got {v!r}",
                hint="pass ints or floats only (bools and strings are refused)",
            )
    return out


def _store(dtype: DType, value: float) -> float:
    """``value`` as stored in ``dtype``: floats rounded, integers checked against the range."""
    bounds = _INT_RANGE.get(dtype)
    if bounds is None:
        try:
            return _round_float(dtype, float(value))
        except OverflowError:  # an int beyond every float
            raise InvalidArgumentError(
                f"an int of {int(value).bit_length()} bits is too large for {dtype.value}",
                hint="pass values within the float range (about 1.8e308), or float('inf')",
            ) from None
    if (isinstance(value, float) and not value.is_integer()) or not bounds[0] <= value <= bounds[1]:
        raise InvalidArgumentError(
            f"{value!r} is not a {dtype.value} value",
            hint=f"use integers from {bounds[0]} to {bounds[1]}",
        )
    return int(value)


def _wrap(dtype: DType, value: float) -> float:
    bounds = _INT_RANGE.get(dtype)
    if bounds is None:
        return value
    low, high = bounds
    span = high - low + 1
    return (int(value) - low) % span + low


def _round_float(dtype: DType, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        return float("nan") if dtype is DType.FP8 else value
    if dtype is DType.FP32:
        return _via_struct("<f", value)
    if dtype is DType.FP16:
        return _via_struct("<e", value)
    if dtype is DType.BF16:
        return _bf16_decode(_bf16_encode(value))
    return _fp8_decode(_fp8_encode(value))


def _via_struct(fmt: str, value: float) -> float:
    try:
        result: float = struct.unpack(fmt, struct.pack(fmt, value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)
    return result


def _bf16_encode(value: float) -> int:
    if math.isnan(value):
        return 0x7FC0
    bits: int = struct.unpack("<I", struct.pack("<f", _via_struct("<f", value)))[0]
    if (bits & 0x7F800000) == 0x7F800000:
        return bits >> 16
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


def _bf16_decode(code: int) -> float:
    result: float = struct.unpack("<f", struct.pack("<I", code << 16))[0]
    return result


@lru_cache(maxsize=1)
def _fp8_table() -> tuple[list[float], list[int]]:
    """Non-negative finite e4m3fn values in ascending order, with their codes."""
    pairs = sorted((_fp8_decode(code), code) for code in range(0x7F))
    return [v for v, _ in pairs], [c for _, c in pairs]


def _fp8_decode(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return float("nan")
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def _fp8_encode(value: float) -> int:
    """Round to nearest, ties to even; beyond the largest finite value (448) is NaN."""
    if math.isnan(value) or abs(value) > 464:
        return 0x7F
    values, codes = _fp8_table()
    magnitude = abs(value)
    i = bisect.bisect_left(values, magnitude)
    if i == len(values):
        i -= 1
    elif i > 0:
        below, above = values[i - 1], values[i]
        if magnitude - below < above - magnitude or (
            magnitude - below == above - magnitude and codes[i - 1] % 2 == 0
        ):
            i -= 1
    code = codes[i]
    return code | 0x80 if math.copysign(1.0, value) < 0 else code


_STRUCT = {DType.FP32: "f", DType.FP16: "e", DType.INT8: "b"}


def _nbytes(dtype: DType, numel: int) -> int:
    return (numel * dtype.bits + 7) // 8


def _numel_of(dtype: DType, nbytes: int) -> int:
    return nbytes * 8 // dtype.bits


def _encode(dtype: DType, values: list[float]) -> bytes:
    fmt = _STRUCT.get(dtype)
    if fmt is not None:
        return struct.pack(f"<{len(values)}{fmt}", *values)
    if dtype is DType.BF16:
        return struct.pack(f"<{len(values)}H", *(_bf16_encode(v) for v in values))
    if dtype is DType.FP8:
        return bytes(_fp8_encode(v) for v in values)
    nibbles = [int(v) & 0xF for v in values] + [0] * (len(values) % 2)
    return bytes(nibbles[i] | nibbles[i + 1] << 4 for i in range(0, len(nibbles), 2))


def _decode(dtype: DType, data: bytes, numel: int) -> list[float]:
    fmt = _STRUCT.get(dtype)
    if fmt is not None:
        return list(struct.unpack(f"<{numel}{fmt}", data))
    if dtype is DType.BF16:
        return [_bf16_decode(c) for c in struct.unpack(f"<{numel}H", data)]
    if dtype is DType.FP8:
        return [_fp8_decode(c) for c in data]
    nibbles = [n for byte in data for n in (byte & 0xF, byte >> 4)][:numel]
    return [n - 16 if n > 7 else n for n in nibbles]
