"""KernelTable: registration, lookup, refusal to overwrite, checks against references."""

from __future__ import annotations

import random
import threading

import pytest

from sagellm_backend import (
    DType,
    InvalidArgumentError,
    KernelExistsError,
    KernelKind,
    KernelNotFoundError,
    MockBackendProvider,
)
from sagellm_backend.kernels import KernelInputs, KernelTable


def scale_inputs(seed: int, dtype: DType) -> KernelInputs:
    rng = random.Random(seed)
    return ([rng.uniform(-4, 4) for _ in range(16)],), {"factor": rng.choice([2.0, 0.5])}


def scale(values: list[float], factor: float) -> list[float]:
    return [v * factor for v in values]


def test_register_get_list() -> None:
    table = KernelTable()
    spec = table.register("scale", scale, kind="fusion", dtypes=["fp32"])
    assert spec.kind is KernelKind.FUSION and spec.dtypes == frozenset({DType.FP32})
    table.register("softmax", scale, kind=KernelKind.SOFTMAX)
    assert table.get("scale") is scale
    assert [s.name for s in table.list()] == ["scale", "softmax"]
    assert [s.name for s in table.list("softmax")] == ["softmax"]


def test_existing_names_are_replaced_only_on_request() -> None:
    table = KernelTable()
    table.register("scale", scale)

    def other(values: list[float], factor: float) -> list[float]:
        return values

    with pytest.raises(KernelExistsError, match="override=True"):
        table.register("scale", other)
    assert table.get("scale") is scale
    table.register("scale", other, override=True)
    assert table.get("scale") is other


def test_unknown_names_list_the_registered_ones_and_suggest() -> None:
    table = KernelTable()
    table.register("rms_norm", scale)
    table.register("silu_and_mul", scale)
    with pytest.raises(KernelNotFoundError) as info:
        table.get("rms_nrom")
    assert isinstance(info.value, LookupError)
    assert "rms_norm, silu_and_mul" in str(info.value)
    assert "did you mean 'rms_norm'" in str(info.value)


@pytest.mark.parametrize("name", [["x"], {}, None, 3, b"scale"], ids=repr)
def test_looking_up_a_name_that_is_not_a_string_is_invalid_argument(name: object) -> None:
    table = KernelTable()
    table.register("scale", scale)
    for lookup in (table.get, table.spec):
        with pytest.raises(InvalidArgumentError, match="a kernel name is a string") as info:
            lookup(name)  # type: ignore[arg-type]  # bad on purpose
        assert info.value.hint
    provider = MockBackendProvider()
    for lookup in (provider.get_kernel, provider.kernel_spec):
        with pytest.raises(InvalidArgumentError, match="a kernel name is a string"):
            lookup(name)  # type: ignore[arg-type]  # bad on purpose


@pytest.mark.parametrize(
    "kwargs",
    [{"name": ""}, {"name": 3}, {"impl": None}, {"impl": 3}, {"kind": "conv"},
     {"dtypes": ["fp64"]}, {"reference": "scale"}],
)  # fmt: skip
def test_bad_registrations_are_refused_and_change_nothing(kwargs: dict[str, object]) -> None:
    table = KernelTable()
    args: dict[str, object] = {"name": "k", "impl": scale, **kwargs}
    with pytest.raises(InvalidArgumentError):
        table.register(**args)  # type: ignore[arg-type]
    assert table.list() == []


def test_check_compares_against_the_reference_on_separate_inputs() -> None:
    table = KernelTable()
    good = table.register("scale", scale, reference=scale, make_inputs=scale_inputs, compare=_close)
    assert good.checkable
    good.check(seed=1, dtype=DType.FP32)

    def off_by_one(values: list[float], factor: float) -> list[float]:
        return [v * factor + 1 for v in values]

    bad = table.register(
        "bad", off_by_one, reference=scale, make_inputs=scale_inputs, compare=_close
    )
    with pytest.raises(AssertionError):
        bad.check(seed=2, dtype=DType.FP32)


def test_check_without_reference_is_refused() -> None:
    spec = KernelTable().register("k", scale)
    assert not spec.checkable
    with pytest.raises(InvalidArgumentError, match="no reference"):
        spec.check(0, DType.FP32)


def test_concurrent_registration_keeps_every_kernel() -> None:
    table = KernelTable()

    def register(start: int) -> None:
        for i in range(start, start + 100):
            table.register(f"k{i}", scale)

    threads = [threading.Thread(target=register, args=(n * 100,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(table.list()) == 400


def _close(result: list[float], expected: list[float], dtype: DType) -> None:
    assert result == pytest.approx(expected), dtype
