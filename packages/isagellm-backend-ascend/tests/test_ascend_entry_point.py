"""The wheel's entry points, its import cost, and the factory's cheap probe."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
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


def test_without_torch_the_reason_names_the_install_of_torch_and_torch_npu(
    tmp_path: Path,
) -> None:
    """The ascend wheel is installed (it is running), so the fix is torch and torch-npu."""
    site = tmp_path / "site"
    site.mkdir()
    for name in ("sagellm_backend", "sagellm_backend_ascend", "typing_extensions"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        origin = Path(spec.origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (site / source.name).symlink_to(source)
    code = (
        "from sagellm_backend.errors import BackendUnavailableError\n"
        "from sagellm_backend_ascend import create_ascend_backend\n"
        "print(create_ascend_backend.unavailable_reason())\n"
        "try:\n"
        "    create_ascend_backend()\n"
        "except BackendUnavailableError as exc:\n"
        "    print(exc.hint)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    reason, hint = result.stdout.strip().splitlines()
    assert reason.startswith("torch is not installed; install torch and the torch-npu release")
    assert "pip install 'torch==X.Y.Z' 'torch-npu==X.Y.Z'" in reason
    for text in (reason, hint):
        assert "isagellm-backend-ascend" not in text and "docs/" not in text
