"""One rank of a multi-process gloo world, run by test_torch_collectives.py as a script.

``python torch_rank.py SCENARIO`` with the launcher's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK), or with ``--explicit`` to pass rank and rendezvous as
options instead. Prints one JSON object: what this rank observed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import torch

from sagellm_backend.errors import BackendError
from sagellm_backend.torch_backend.cpu import create_cpu_backend
from sagellm_backend.torch_backend.cpu_device import HostEvent, HostStream
from sagellm_backend.torch_backend.provider import TorchBackendProvider

Provider = TorchBackendProvider[HostStream, HostEvent]


def refusal(call: Callable[[], object]) -> str:
    """The error code ``call`` raised, or "accepted"."""
    try:
        call()
    except BackendError as exc:
        return exc.code.value
    return "accepted"


def ops(p: Provider) -> dict[str, object]:
    r, n = p.rank, p.world_size
    out: dict[str, object] = {"rank": r, "world_size": n, "device": p.device}
    base = torch.tensor([r + 1.0, -2.0 * (r + 1), 0.5 + r], dtype=torch.float32)
    for op in ("sum", "prod", "min", "max", "avg"):
        out[f"all_reduce_{op}"] = p.all_reduce(base.clone(), op).tolist()
    bits = torch.tensor([1 << r, 0b1010 + r], dtype=torch.int32)
    for op in ("band", "bor", "bxor"):
        out[f"all_reduce_{op}"] = p.all_reduce(bits.clone(), op).tolist()
    out["all_gather"] = p.all_gather(torch.tensor([[r, 10 * r]], dtype=torch.int64)).tolist()
    chunks = torch.arange(2 * n, dtype=torch.float64) * (r + 1)
    out["reduce_scatter"] = p.reduce_scatter(chunks).tolist()
    out["broadcast"] = p.broadcast(torch.full((2,), float(r)), src=n - 1).tolist()
    received = torch.zeros(3, dtype=torch.bfloat16)
    if r % 2 == 0 and r + 1 < n:
        p.send(torch.tensor([r + 0.5, r + 1.5, r + 2.5], dtype=torch.bfloat16), dst=r + 1)
    elif r % 2 == 1:
        out["recv"] = p.recv(received, src=r - 1).float().tolist()
    p.barrier()
    out["refused"] = {
        "bxor_float": refusal(lambda: p.all_reduce(torch.ones(2), "bxor")),
        "avg_int": refusal(lambda: p.all_reduce(torch.ones(2, dtype=torch.int32), "avg")),
        "fp8": refusal(lambda: p.all_reduce(torch.ones(2).to(torch.float8_e4m3fn))),
        "reduce_scatter_indivisible": refusal(lambda: p.reduce_scatter(torch.ones(n + 1))),
        "send_to_self": refusal(lambda: p.send(torch.ones(1), dst=r)),
        "unknown_op": refusal(lambda: p.all_reduce(torch.ones(1), "mean")),
    }
    shape = 4 if r == 0 else 3
    out["mismatch"] = refusal(lambda: p.all_reduce(torch.ones(shape)))
    out["after_refusals"] = p.all_reduce(torch.ones(1)).tolist()
    return out


def timeout(p: Provider) -> dict[str, object]:
    """Rank 0 waits in an all_reduce that rank 1 never joins."""
    if p.rank != 0:
        time.sleep(6.0)
        return {"rank": p.rank}
    start = time.monotonic()
    first = refusal(lambda: p.all_reduce(torch.ones(2), timeout=1.0))
    elapsed = time.monotonic() - start
    return {"rank": 0, "first": first, "elapsed": elapsed, "then": refusal(lambda: p.barrier())}


def timeouts(p: Provider) -> dict[str, object]:
    """Huge finite timeouts wait up to the cap; bad ones are refused and write nothing."""
    out: dict[str, object] = {"rank": p.rank}
    mine = [p.rank + 1.0, -0.5 * (p.rank + 1)]
    for name, timeout in (("9.3e9", 9.3e9), ("1.5e10", 1.5e10), ("10**400", 10**400)):
        out[name] = p.all_reduce(torch.tensor(mine), timeout=timeout).tolist()
    refused: dict[str, object] = {}
    for bad in ("5", float("inf"), float("-inf"), float("nan"), -1.0, 0, True):
        tensor = torch.tensor(mine)
        code = refusal(lambda t=tensor, b=bad: p.all_reduce(t, timeout=b))  # type: ignore[misc]
        refused[repr(bad)] = [code, tensor.tolist() == mine]
    out["refused"] = refused
    out["barrier"] = refusal(lambda: p.barrier(timeout=float("nan")))
    out["after"] = p.all_reduce(torch.tensor(mine), timeout=1e300).tolist()
    return out


def edges(p: Provider) -> dict[str, object]:
    """Refusals gloo needs, NaN in min and max, barrier and deep shapes checked across ranks."""
    r, n = p.rank, p.world_size
    out: dict[str, object] = {"rank": r}
    out["refused"] = {
        "int16": refusal(lambda: p.all_reduce(torch.ones(2, dtype=torch.int16))),
        "uint32": refusal(lambda: p.all_gather(torch.ones(2, dtype=torch.uint32))),
        "conj": refusal(lambda: p.all_reduce(torch.ones(2, dtype=torch.complex64).conj())),
        "complex_max": refusal(lambda: p.all_reduce(torch.ones(2, dtype=torch.complex64), "max")),
    }
    out["complex_sum"] = str(p.all_reduce(torch.full((1,), 1 + 2j)).tolist())
    rows = torch.arange(n * n, dtype=torch.float32).view(n, n)
    rows[r, r] = float("nan")  # rank r's NaN is at position r
    for op in ("max", "min"):
        out[op] = [str(v) for v in p.all_reduce(rows[0].clone(), op).tolist()]
        diagonal = rows.diagonal().clone()
        out[f"{op}_scatter"] = [str(v) for v in p.reduce_scatter(diagonal, op).tolist()]
    out["barrier_mismatch"] = refusal(
        lambda: p.barrier() if r == 0 else p.all_reduce(torch.ones(3))
    )
    deep = (1,) * 8 + ((2, 3) if r == 0 else (3, 2))
    out["deep_mismatch"] = refusal(lambda: p.all_reduce(torch.ones(deep)))
    out["after"] = p.all_reduce(torch.ones(1)).tolist()
    return out


def long_wait(p: Provider) -> dict[str, object]:
    """A per-call timeout longer than collective_timeout (1 s) is waited for in full."""
    if p.rank == 1:
        time.sleep(2.5)
    start = time.monotonic()
    result = p.all_reduce(torch.ones(2), timeout=20.0).tolist()
    return {"rank": p.rank, "result": result, "waited": time.monotonic() - start}


def main() -> None:
    scenario = sys.argv[1]
    if "--explicit" in sys.argv:
        p: Provider = create_cpu_backend(
            rank=int(os.environ.pop("RANK")),
            world_size=int(os.environ.pop("WORLD_SIZE")),
            master_addr=os.environ.pop("MASTER_ADDR"),
            master_port=int(os.environ.pop("MASTER_PORT")),
            num_blocks=8,
            host_num_blocks=8,
        )
    else:
        seconds = 1.0 if scenario == "long_wait" else 30.0
        p = create_cpu_backend(num_blocks=8, host_num_blocks=8, collective_timeout=seconds)
    scenarios = {
        "ops": ops,
        "timeout": timeout,
        "timeouts": timeouts,
        "edges": edges,
        "long_wait": long_wait,
    }
    result = scenarios[scenario](p)
    print(json.dumps(result), flush=True)
    if scenario == "timeout":
        os._exit(0)  # the stuck all_reduce cannot be cancelled; do not wait for it at exit
    p.close()


if __name__ == "__main__":
    main()
