"""The mock passes the conformance kit, through the pytest base class and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sagellm_backend.cli.check import CHECK_MOCK_MEMORY_MB, sized_for_check
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing import STANDARD_CHECKS, MockTarget
from sagellm_backend.testing.suite import BackendConformanceSuite

SRC = Path(__file__).resolve().parents[1] / "src"


class TestMockConformance(BackendConformanceSuite):
    def make_target(self) -> MockTarget:
        return MockTarget()


class TestFullyCapableMockConformance(BackendConformanceSuite):
    def make_target(self) -> MockTarget:
        return MockTarget(
            supported_dtypes=["fp32", "fp16", "bf16", "fp8", "int8", "int4"],
            supported_kernels=["matmul", "attention", "fusion", "layernorm", "softmax"],
            has_graph_exec=True,
        )


class TestMinimalMockConformance(BackendConformanceSuite):
    def make_target(self) -> MockTarget:
        return MockTarget(
            supported_dtypes=["fp32"],
            supported_kernels=[],
            has_stream=False,
            has_event=False,
            has_collective=False,
            has_kv_block_copy=False,
            has_kv_block_migrate=False,
            supported_reduce_ops=["sum"],
        )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("SAGELLM_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "sagellm_backend", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_check_command_passes_the_mock_and_prints_the_table() -> None:
    done = _cli("check", "mock?max_memory_mb=64&has_graph_exec=true")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["check", "result", "time", "detail"]
    assert any(line.startswith("graph.replay ") and " passed " in line for line in lines)
    skip = next(line for line in lines if line.startswith("graph.refused "))
    assert "claimed: has_graph_exec=True" in skip
    assert "0 failed" in lines[-1] and "world sizes: 1, 2, 4" in lines[-1]


def test_check_command_exhausts_the_default_mock_with_a_small_pool() -> None:
    done = _cli("check", "mock", "--only", "kv.exhaustion", "--json", "--seed", "4")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [result] = report["results"]
    assert result["outcome"] == "passed", result["message"]
    assert report["target"] == f"mock?max_memory_mb={CHECK_MOCK_MEMORY_MB}"
    assert report["seed"] == 4


def test_check_command_skips_exhaustion_of_a_large_pool_with_the_reason() -> None:
    done = _cli("check", "mock?max_memory_mb=16384", "--only", "kv.exhaustion", "--json")
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)["results"]
    assert result["outcome"] == "skipped"
    assert "larger than the target's exhaustion limit" in result["message"]


@pytest.mark.parametrize(
    ("spec", "env", "sized"),
    [
        (None, None, f"mock?max_memory_mb={CHECK_MOCK_MEMORY_MB}"),
        (None, "cpu", None),
        (None, "MOCK:1", f"mock:1?max_memory_mb={CHECK_MOCK_MEMORY_MB}"),
        ("mock?max_memory_mb=8", None, "mock?max_memory_mb=8"),
        ("cpu, mock?num_layers=1", None,
         f"cpu,mock?num_layers=1&max_memory_mb={CHECK_MOCK_MEMORY_MB}"),
        ("auto", None, "auto"),
        ("mock :0", None, "mock :0"),
    ],
)  # fmt: skip
def test_check_sizes_only_mock_candidates_without_a_pool(
    spec: str | None, env: str | None, sized: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv("SAGELLM_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SAGELLM_BACKEND", env)
    assert sized_for_check(spec) == sized


def test_check_command_exit_codes() -> None:
    assert _cli("check", "mock", "--only", "warp-drive").returncode == 2
    assert _cli("check", "nosuchkind").returncode == 2
    assert _cli("check", "mock?max_memory_mb=-1").returncode == 2


def test_importing_the_core_imports_neither_the_kit_nor_pytest() -> None:
    code = (
        "import sys, sagellm_backend; "
        "print(sorted(m for m in sys.modules "
        "if m == 'pytest' or m.startswith('sagellm_backend.testing')))"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "[]"
    code = "import sys, sagellm_backend.testing; print('pytest' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "False"


def test_every_standard_check_is_documented() -> None:
    text = (Path(__file__).resolve().parents[3] / "docs" / "conformance.md").read_text()
    missing = [c.id for c in STANDARD_CHECKS if f"| `{c.id}` | {c.promise} |" not in text]
    assert not missing


def test_without_a_spec_the_target_is_the_one_sagellm_backend_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sagellm_backend.testing.spec_target import target_for_spec

    monkeypatch.setenv("SAGELLM_BACKEND", "mock?max_memory_mb=32")
    target = target_for_spec(None)
    assert target.name == "mock?max_memory_mb=32"
    provider = target.make_provider()
    try:
        assert provider.capability().total_memory_bytes == 32 << 20
    finally:
        provider.close()


def test_a_spec_targets_world_ranks_share_every_option_of_the_spec() -> None:
    from sagellm_backend.mock import MockBackendProvider
    from sagellm_backend.testing.spec_target import target_for_spec

    target = target_for_spec(
        "mock?validate_collectives=false&supported_ops=sample&max_batch_size=7"
    )

    def seen(_: object, provider: BackendProvider[Any]) -> tuple[object, ...]:
        assert isinstance(provider, MockBackendProvider)
        cap = provider.capability()
        return provider.options["validate_collectives"], cap.supported_ops, cap.max_batch_size

    outcomes = target.run_world(2, seen, timeout=10)
    assert [o.value for o in outcomes] == [(False, ("sample",), 7)] * 2
