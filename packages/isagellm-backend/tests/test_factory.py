"""BackendFactory: option declaration and conversion, config objects, lazy creation, probes."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from sagellm_backend import (
    BackendUnavailableError,
    ErrorCode,
    InvalidArgumentError,
    UnknownOptionError,
)
from sagellm_backend.factory import BackendFactory, DeviceSelection, Option

OPTIONS = [
    Option("blocks", int, 8, "number of KV blocks"),
    Option("ratio", float, None, "a fraction"),
    Option("pinned", bool, False, "use pinned memory"),
    Option("name", str, None, "a label"),
    Option("ids", tuple, None, "device ids"),
]


@dataclass
class Made:
    device: DeviceSelection
    options: dict[str, object] = field(default_factory=dict)


def make(device: DeviceSelection, **options: object) -> Made:
    return Made(device, options)


def factory(**kwargs: object) -> BackendFactory[Made]:
    return BackendFactory("fake", make, options=OPTIONS, **kwargs)  # type: ignore[arg-type]


def test_defaults_and_conversion_from_config_string_text() -> None:
    made = factory()(None, ratio="0.5", pinned="yes", name="x", ids="0+3")
    assert made.options == {"blocks": 8, "ratio": 0.5, "pinned": True, "name": "x", "ids": (0, 3)}
    assert factory()().options == {"blocks": 8, "pinned": False}


@pytest.mark.parametrize(
    ("name", "value"),
    [("blocks", "eight"), ("blocks", True), ("blocks", 1.5), ("pinned", "maybe"),
     ("ratio", "fast"), ("name", 3), ("ids", "0,1"), ("ids", 7), ("blocks", "\u0668"),
     ("blocks", "--8"), ("ids", "0+\u0661")],
)  # fmt: skip
def test_bad_option_values_are_refused_with_the_help(name: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        factory()(**{name: value})
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("ratio", "nan", "not a finite number"),
        ("ratio", "-inf", "not a finite number"),
        ("ratio", "1e309", "not a finite number"),
        ("ratio", math.nan, "not a finite number"),
        ("ratio", math.inf, "not a finite number"),
        ("blocks", 2**63, "outside the 64-bit integer range"),
        ("blocks", str(-(2**63) - 1), "outside the 64-bit integer range"),
        ("ids", "0+" + "9" * 30, "outside the 64-bit integer range"),
        ("blocks", "\u0663", "not a valid int"),
        ("ratio", "\u0661.5", "not a valid finite float"),
    ],
)
def test_values_no_device_can_take_are_refused(name: str, value: object, problem: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        factory()(**{name: value})
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert f"option {name}={value!r} is {problem}" == info.value.message
    assert info.value.hint is not None and info.value.hint.startswith(f"pass {name} as a ")


def test_the_extremes_of_the_ranges_are_accepted() -> None:
    made = factory()(None, blocks=2**63 - 1, ratio="1e308", ids=[-(2**63)])
    assert made.options["blocks"] == 2**63 - 1 and made.options["ratio"] == 1e308
    assert made.options["ids"] == (-(2**63),)


def test_a_non_ascii_device_index_is_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        factory()(SimpleNamespace(device="\u0661"))


def test_unknown_option_lists_the_known_ones() -> None:
    with pytest.raises(UnknownOptionError) as info:
        factory()(blockz=3)
    assert "blockz" in str(info.value) and "blocks" in str(info.value)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (None, DeviceSelection()),
        (SimpleNamespace(kind="fake", device=None, device_ids=None), DeviceSelection()),
        (SimpleNamespace(kind="fake", device="2", device_ids=None), DeviceSelection(2)),
        (SimpleNamespace(kind="fake", device="fake:1", device_ids=[]), DeviceSelection(1)),
        (SimpleNamespace(kind="fake", device=None, device_ids=[3]), DeviceSelection(3, (3,))),
    ],
)
def test_config_objects_select_the_device(config: object, expected: DeviceSelection) -> None:
    assert factory()(config).device == expected


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SimpleNamespace(device="other:1"), "names another kind"),
        (SimpleNamespace(device="fake:x"), "malformed device"),
        (SimpleNamespace(device="\u0661"), "malformed device"),
        (SimpleNamespace(device="fake:\u0661"), "malformed device"),
        (SimpleNamespace(device="1\n"), "malformed device"),
        (SimpleNamespace(device=None, device_ids=[0, 1]), "one device per provider"),
        (SimpleNamespace(device="1", device_ids=[0]), "not among device_ids"),
    ],
)
def test_config_objects_are_validated(config: object, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        factory()(config)


def test_multi_device_backends_accept_several_ids() -> None:
    made = factory(multi_device=True)(SimpleNamespace(device=None, device_ids=(0, 1)))
    assert made.device == DeviceSelection(0, (0, 1))


def test_unavailable_backend_says_why_and_how_to_fix_it() -> None:
    f = factory(probe=lambda: "no device", install_hint="pip install fake")
    assert f.unavailable_reason() == "no device"
    with pytest.raises(BackendUnavailableError) as info:
        f()
    assert "no device" in str(info.value) and "pip install fake" in str(info.value)


def test_create_target_is_imported_only_when_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lazy_fake_backend.py").write_text(
        "from sagellm_backend.factory import DeviceSelection\n"
        "def create(device: DeviceSelection, **options: object) -> str:\n"
        "    return f'made on {device.index}'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    lazy: BackendFactory[str] = BackendFactory("lazy", "lazy_fake_backend:create")
    assert "lazy_fake_backend" not in sys.modules
    assert lazy(SimpleNamespace(device="lazy:4")) == "made on 4"
    assert "lazy_fake_backend" in sys.modules


def test_validation_happens_before_the_probe_and_the_import() -> None:
    calls: list[str] = []

    def probe() -> str | None:
        calls.append("probe")
        return None

    f: BackendFactory[Made] = BackendFactory(
        "fake", "no_such_module_anywhere:create", options=OPTIONS, probe=probe
    )
    with pytest.raises(UnknownOptionError):
        f(nope=1)
    assert calls == []
