"""Collectives over real processes on gloo: worlds of 2 and 4 ranks, results checked."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from functools import reduce
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

WORKER = Path(__file__).with_name("torch_rank.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def launch(world_size: int, scenario: str, *, explicit: bool = False) -> list[dict[str, object]]:
    """Run the worker on every rank as torchrun would; each rank's JSON, in rank order."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(sys.path),
        }
        args = [sys.executable, str(WORKER), scenario, *(["--explicit"] if explicit else [])]
        procs.append(
            subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=90)
            assert proc.returncode == 0, stderr.decode()[-3000:]
            results.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.mark.slow
@pytest.mark.parametrize(("world_size", "explicit"), [(2, True), (4, False)])
def test_collectives_compute_the_right_values(world_size: int, explicit: bool) -> None:
    results = launch(world_size, "ops", explicit=explicit)
    n = world_size
    base = [[r + 1.0, -2.0 * (r + 1), 0.5 + r] for r in range(n)]
    columns = list(zip(*base, strict=True))
    expected = {
        "sum": [math.fsum(c) for c in columns],
        "prod": [math.prod(c) for c in columns],
        "min": [min(c) for c in columns],
        "max": [max(c) for c in columns],
        "avg": [math.fsum(c) / n for c in columns],
    }
    bits = [[1 << r, 0b1010 + r] for r in range(n)]
    bit_columns = list(zip(*bits, strict=True))
    bitwise = {
        "band": [reduce(lambda a, b: a & b, c) for c in bit_columns],
        "bor": [reduce(lambda a, b: a | b, c) for c in bit_columns],
        "bxor": [reduce(lambda a, b: a ^ b, c) for c in bit_columns],
    }
    summed = [sum(i * (r + 1) for r in range(n)) for i in range(2 * n)]
    for r, got in enumerate(results):
        assert (got["rank"], got["world_size"], got["device"]) == (r, n, "cpu:0")
        for op, values in expected.items():
            assert got[f"all_reduce_{op}"] == pytest.approx(values, rel=1e-6), op
        for op, ints in bitwise.items():
            assert got[f"all_reduce_{op}"] == ints, op
        assert got["all_gather"] == [[q, 10 * q] for q in range(n)]
        assert got["reduce_scatter"] == summed[2 * r : 2 * r + 2]
        assert got["broadcast"] == [float(n - 1)] * 2
        if r % 2 == 1:
            assert got["recv"] == [r - 0.5, r + 0.5, r + 1.5]
        assert got["refused"] == {
            "bxor_float": "comm_backend_not_supported",
            "avg_int": "comm_backend_not_supported",
            "fp8": "comm_backend_not_supported",
            "reduce_scatter_indivisible": "invalid_argument",
            "send_to_self": "invalid_argument",
            "unknown_op": "invalid_argument",
        }
        assert got["mismatch"] == "comm_rank_mismatch"
        assert got["after_refusals"] == [float(n)]


@pytest.mark.slow
def test_a_missing_rank_times_out_and_breaks_the_group() -> None:
    rank0, _ = launch(2, "timeout")
    assert rank0["first"] == "comm_timeout"
    assert isinstance(rank0["elapsed"], float)
    assert 0.9 <= rank0["elapsed"] < 5.0
    assert rank0["then"] == "comm_group_invalid"


@pytest.mark.slow
def test_huge_timeouts_are_capped_and_bad_ones_refused_without_writing() -> None:
    results = launch(2, "timeouts")
    for r, got in enumerate(results):
        assert got["rank"] == r
        for key in ("9.3e9", "1.5e10", "10**400", "after"):
            assert got[key] == [3.0, -1.5], key
        assert got["refused"] == {
            bad: ["invalid_argument", True]
            for bad in ("'5'", "inf", "-inf", "nan", "-1.0", "0", "True")
        }
        assert got["barrier"] == "invalid_argument"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_gloo_gaps_are_refused_nan_propagates_and_barriers_are_checked(world_size: int) -> None:
    n = world_size
    for r, got in enumerate(launch(n, "edges")):
        assert got["refused"] == {
            "int16": "comm_backend_not_supported",
            "uint32": "comm_backend_not_supported",
            "conj": "invalid_argument",
            "complex_max": "comm_backend_not_supported",
        }
        assert got["complex_sum"] == str([complex(n, 2 * n)])
        # Row 0 of rank q holds NaN at q when q == 0 only; the diagonal holds NaN at q.
        for op in ("max", "min"):
            pick = max if op == "max" else min
            expected = ["nan"] + [str(float(pick(j for _ in range(n)))) for j in range(1, n)]
            assert got[op] == expected, op
            assert got[f"{op}_scatter"] == ["nan"], op
        assert got["barrier_mismatch"] == "comm_rank_mismatch"
        assert got["deep_mismatch"] == "comm_rank_mismatch"
        assert got["after"] == [float(n)], f"rank {r}: the group stays usable"


@pytest.mark.slow
def test_a_per_call_timeout_longer_than_collective_timeout_is_waited_for() -> None:
    rank0, rank1 = launch(2, "long_wait")
    assert rank0["result"] == rank1["result"] == [2.0, 2.0]
    waited = rank0["waited"]
    assert isinstance(waited, float) and waited > 1.5, "past collective_timeout (1 s)"
