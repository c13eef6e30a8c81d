"""Importing the core (and any installed plugin) imports no torch, vendor or heavy library."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torch_npu", "triton", "numpy", "cupy", "pytest", "sagellm_protocol")
PACKAGES = ["sagellm_backend", "sagellm_backend_cuda", "sagellm_backend_ascend"]


def imported_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("package", PACKAGES)
def test_import_loads_nothing_heavy(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed in this environment")
    modules = imported_after(f"import {package}")
    assert package in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == []


def test_loading_every_entry_point_target_loads_nothing_heavy() -> None:
    modules = imported_after(
        "from importlib.metadata import entry_points\n"
        "targets = [ep.load() for ep in entry_points(group='sagellm.backends')]\n"
        "assert targets"
    )
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == []


def test_the_mock_and_the_registry_load_on_first_use() -> None:
    modules = imported_after("import sagellm_backend")
    assert not {"sagellm_backend.mock", "sagellm_backend.registry"} & modules
    modules = imported_after("from sagellm_backend import get_backend, MockBackendProvider")
    assert {"sagellm_backend.mock", "sagellm_backend.registry"} <= modules


def test_every_exported_name_resolves() -> None:
    import sagellm_backend

    for name in sagellm_backend.__all__:
        assert getattr(sagellm_backend, name) is not None, name


def test_starting_the_mock_evaluates_no_annotation_strings() -> None:
    """A NamedTuple or TypedDict declared under postponed annotations compiles each field's
    string when the class is made (the first compile costs about 1 ms); the value types on the
    path of ``get_backend("mock")`` are declared with evaluated annotations."""
    code = (
        "import builtins, json\n"
        "compile_ = builtins.compile\n"
        "evaluated = []\n"
        "def counting(source, filename, mode, *args, **kwargs):\n"
        "    if mode == 'eval':\n"
        "        evaluated.append(source if isinstance(source, str) else repr(source))\n"
        "    return compile_(source, filename, mode, *args, **kwargs)\n"
        "builtins.compile = counting\n"
        "from sagellm_backend import get_backend\n"
        "get_backend('mock').close()\n"
        "print(json.dumps(evaluated))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(out) == []
