"""The wheel's entry points, its import cost, and the factory's cheap probe."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

RunPython = Callable[..., "subprocess.CompletedProcess[str]"]
"""The ``run_python`` fixture (conftest.py): a snippet in a fresh interpreter."""

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def _section(name: str) -> dict[str, str]:
    text = PYPROJECT.read_text()
    body = text.split(f'[project.entry-points."{name}"]', 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^(\w+) = "([^"]+)"$', body, re.MULTILINE))


def test_each_kind_is_an_entry_point_of_its_own() -> None:
    assert _section("sagellm.backends") == {
        "ascend": "sagellm_backend_ascend:create_ascend_backend",
        "ascend_cann": "sagellm_backend_ascend:create_ascend_backend",
        "npu": "sagellm_backend_ascend:create_ascend_backend",
    }
    assert _section("sagellm.conformance") == {
        "ascend": "sagellm_backend_ascend.testing:target_for_spec"
    }


def test_torch_npu_is_no_requirement() -> None:
    requirements = re.search(r"^dependencies = \[(.*)\]$", PYPROJECT.read_text(), re.MULTILINE)
    assert requirements is not None
    assert "torch" in requirements.group(1)
    assert "npu" not in requirements.group(1)


def test_import_and_entry_point_load_import_neither_torch_nor_torch_npu(
    run_python: RunPython,
) -> None:
    result = run_python(
        "import sys, importlib\n"
        "module = importlib.import_module('sagellm_backend_ascend')\n"
        "factory = module.create_ascend_backend\n"
        "assert factory.kind == 'ascend' and factory.aliases == ('ascend_cann', 'npu')\n"
        "factory.unavailable_reason()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torch_npu')))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch installed")
def test_probe_names_the_missing_torch_npu_without_importing_anything(
    run_python: RunPython,
) -> None:
    result = run_python(
        "import sys\n"
        "from sagellm_backend_ascend.availability import probe\n"
        "print(probe())\n"
        "print('torch' in sys.modules)",
        fake=False,
    )
    assert result.returncode == 0, result.stderr
    reason, imported = result.stdout.strip().splitlines()
    assert reason.startswith("torch-npu is not installed; pip install 'torch-npu==")
    assert imported == "False"


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.5.1.post1", "2.5.1"), ("2.13.0+cpu", "2.13.0"), ("2.10.0rc2", "2.10.0")],
)
def test_release_reads_the_torch_version_a_torch_npu_pairs_with(
    version: str, expected: str
) -> None:
    from sagellm_backend_ascend.availability import release

    assert release(version) == expected
