"""The fused operators on the torch_npu stand-in: each against a float64 computation written
here, on fresh random inputs with unused cache slots poisoned with NaN; what each leaves to the
reference; what each refuses, changing nothing; and which ones a SoC family gets."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("torch", reason="needs torch: pip install isagellm-backend-ascend")

import torch

from sagellm_backend.dtypes import DType
from sagellm_backend.errors import GraphCaptureError, InvalidArgumentError
from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend.torch_backend.rotary import rotary_cos_sin_cache, rotary_embedding
from sagellm_backend_ascend import create_ascend_backend
from sagellm_backend_ascend.kernels import FUSED_OPS
from sagellm_backend_ascend.runtime import NpuEvent, NpuStream
from sagellm_backend_ascend.soc import SocFamily

torch_npu = pytest.importorskip("torch_npu", reason="the stand-in is on sys.path (conftest)")

Provider = TorchBackendProvider[NpuStream, NpuEvent]
RunPython = Callable[..., "subprocess.CompletedProcess[str]"]

NPU = torch.device("npu", 0)
FLOATS = [torch.float16, torch.bfloat16, torch.float32]
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}
BY_NAME = {fused.name: fused for fused in FUSED_OPS}


class Reference:
    """A stand-in for the torch layer's reference that records the calls it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append((args, kwargs))
        return "reference"


def fused(name: str) -> tuple[Any, Reference]:
    """The op ``name`` over this torch_npu's operator, with a recording reference."""
    reference = Reference()
    spec = BY_NAME[name]
    return spec.wrap(getattr(torch_npu, spec.operator), reference, torch_npu), reference


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(NPU)


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu().double(), expected, rtol=tol, atol=tol)


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


@pytest.fixture
def backend() -> Iterator[Provider]:
    provider = create_ascend_backend(num_blocks=16, host_num_blocks=8, pin_host_memory=False)
    yield provider
    provider.close()


@pytest.mark.parametrize("dtype", FLOATS)
def test_rms_norm(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    op, reference = fused("rms_norm")
    x, weight = randn(g, 3, 5, 96, dtype=dtype), randn(g, 96, dtype=dtype)
    got = op(x, weight, 1e-5)
    close(got, rms(x.cpu().double(), weight.cpu().double(), 1e-5), dtype)
    assert got.dtype == dtype and reference.calls == []
    assert op(x, weight.float() if dtype != torch.float32 else weight.half(), 1e-5) == "reference"


@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_add_rms_norm_updates_both_in_place(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    op, reference = fused("fused_add_rms_norm")
    x, residual = randn(g, 7, 64, dtype=dtype), randn(g, 7, 64, dtype=dtype)
    weight = randn(g, 64, dtype=dtype)
    total = x.cpu().double() + residual.cpu().double()
    out_x, out_residual = op(x, residual, weight, 1e-6)
    assert out_x is x and out_residual is residual and reference.calls == []
    close(residual, total, dtype)
    close(x, rms(total, weight.cpu().double(), 1e-6), dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    op, reference = fused("silu_and_mul")
    x = randn(g, 4, 2, 80, dtype=dtype)
    wide = x.cpu().double()
    gate, up = wide[..., :40], wide[..., 40:]
    close(op(x), gate / (1 + torch.exp(-gate)) * up, dtype)
    assert reference.calls == []
    assert op(x.transpose(0, 1)) == "reference"  # swiglu takes contiguous input only


@pytest.mark.parametrize("dtype", FLOATS)
def test_rotary_embedding_rotates_the_first_rotary_dim_in_place(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    op, reference = fused("rotary_embedding")
    n, heads, kv_heads, size, rotary = 9, 4, 2, 64, 32
    positions = torch.randint(0, 100, (n,), generator=g)
    angles = torch.outer(
        torch.arange(100, dtype=torch.float64),
        10000.0 ** (-torch.arange(0, rotary, 2, dtype=torch.float64) / rotary),
    )
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype).to(NPU)
    query, key = randn(g, n, heads, size, dtype=dtype), randn(g, n, kv_heads, size, dtype=dtype)
    originals = (query.cpu().double(), key.cpu().double())
    out = op(positions.to(NPU), query, key, cache)
    assert out[0] is query and out[1] is key and reference.calls == []
    cos_sin = cache.cpu().double()[positions]
    turn = torch.complex(cos_sin[:, : rotary // 2], cos_sin[:, rotary // 2 :]).unsqueeze(1)
    for got, before in zip(out, originals, strict=True):
        z = torch.complex(before[..., : rotary // 2], before[..., rotary // 2 : rotary]) * turn
        close(got[..., :rotary], torch.cat([z.real, z.imag], dim=-1), dtype)
        assert torch.equal(got[..., rotary:].cpu().double(), before[..., rotary:])
    assert op(positions.to(NPU), query, key, cache, is_neox=False) == "reference"
    assert reference.calls[0][1] == {"is_neox": False}


def poisoned_cache(
    g: torch.Generator, pages: int, tokens: int, kv_heads: int, size: int, dtype: torch.dtype
) -> torch.Tensor:
    return torch.full((pages, 2, tokens, kv_heads, size), float("nan"), dtype=dtype, device=NPU)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kv_cache_write_writes_only_valid_slots(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    op, reference = fused("kv_cache_write")
    pages, tokens, kv_heads, size, new = 6, 4, 2, 16, 10
    cache = poisoned_cache(g, pages, tokens, kv_heads, size, dtype)
    slots = torch.randperm(pages * tokens, generator=g)[:new]
    slots[2], slots[5], slots[7] = -1, pages * tokens, -7  # padding, and two never written
    key, value = (
        randn(g, new, kv_heads, size, dtype=dtype),
        randn(g, new, kv_heads, size, dtype=dtype),
    )
    op(key, value, cache, slots.to(NPU))
    assert reference.calls == []
    host = cache.cpu()
    written = 0
    for i, slot in enumerate(slots.tolist()):
        if 0 <= slot < pages * tokens:
            page, offset = divmod(slot, tokens)
            assert torch.equal(host[page, 0, offset], key[i].cpu())
            assert torch.equal(host[page, 1, offset], value[i].cpu())
            written += 1
    assert written == new - 3
    assert int(torch.isnan(host).sum()) == (pages * tokens - written) * 2 * kv_heads * size
    op(key.float(), value.float(), cache.float(), slots.to(NPU))
    assert len(reference.calls) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_attention_decode_reads_only_live_slots(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(6)
    op, reference = fused("paged_attention_decode")
    batch, heads, kv_heads, size, tokens, pages, width = 3, 4, 2, 32, 8, 12, 3
    cache = poisoned_cache(g, pages, tokens, kv_heads, size, dtype)
    tables = torch.randperm(pages, generator=g)[: batch * width].view(batch, width)
    lens = [1, tokens + 3, width * tokens]
    for b, length in enumerate(lens):
        for t in range(length):
            page, offset = tables[b, t // tokens], t % tokens
            cache[page, :, offset] = randn(g, 2, kv_heads, size, dtype=dtype)
    query = randn(g, batch, heads, size, dtype=dtype)
    out = torch.full((batch, heads, size), float("nan"), dtype=dtype, device=NPU)
    got = op(query, cache, tables.int().to(NPU), torch.tensor(lens).to(NPU), 0.2, out=out)
    assert got is out and reference.calls == []
    host = cache.cpu().double()
    for b, length in enumerate(lens):
        rows = [host[tables[b, t // tokens], :, t % tokens] for t in range(length)]
        keys, values = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        for h in range(heads):
            weights = torch.softmax(
                keys[:, h * kv_heads // heads] @ query[b, h].cpu().double() * 0.2, 0
            )
            close(out[b, h], weights @ values[:, h * kv_heads // heads], dtype)


def test_attention_under_a_graph_capture_is_refused_before_anything() -> None:
    calls: list[object] = []

    def operator(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return torch_npu.npu_fused_infer_attention_score(*args, **kwargs)

    reference = Reference()
    op = BY_NAME["paged_attention_decode"].wrap(operator, reference, torch_npu)
    side = torch_npu.npu.Stream(0)
    graph = torch_npu.npu.NPUGraph()
    args = (
        torch.zeros(1, 2, 8, dtype=torch.float16, device=NPU),
        torch.zeros(2, 2, 4, 1, 8, dtype=torch.float16, device=NPU),
        torch.zeros(1, 1, dtype=torch.int32, device=NPU),
        torch.ones(1, dtype=torch.int32, device=NPU),
    )
    out = torch.full((1, 2, 8), 7.0, dtype=torch.float16, device=NPU)
    capture = torch_npu.npu.graph(graph, stream=side)
    with capture, pytest.raises(GraphCaptureError, match="sequence lengths on the host"):
        op(*args, 0.5, out=out)
    assert calls == [] and reference.calls == []
    assert bool((out.cpu() == 7).all())
    assert op(*args, 0.5).shape == (1, 2, 8) and len(calls) == 1  # served outside a capture


def test_attention_hands_the_operator_contiguous_query_and_block_table() -> None:
    seen: list[bool] = []

    def operator(query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.extend([query.is_contiguous(), kwargs["block_table"].is_contiguous()])
        return torch_npu.npu_fused_infer_attention_score(query, *args, **kwargs)

    g = torch.Generator().manual_seed(9)
    op = BY_NAME["paged_attention_decode"].wrap(operator, Reference(), torch_npu)
    cache = randn(g, 6, 2, 4, 2, 16, dtype=torch.float16)
    query = randn(g, 2, 3 * 4 * 16, dtype=torch.float16)[:, : 4 * 16].view(2, 4, 16)
    tables = torch.tensor([[1, 2, 3], [4, 5, 0]], dtype=torch.int32).t().contiguous().t()
    lens = torch.tensor([9, 5], dtype=torch.int32).to(NPU)
    assert not query.is_contiguous() and not tables.is_contiguous()
    got = op(query, cache, tables.to(NPU), lens, 0.25)
    assert seen == [True, True]
    expected = op(query.contiguous(), cache, tables.contiguous().to(NPU), lens, 0.25)
    assert torch.equal(got.cpu(), expected.cpu())


def test_rotary_leaves_tokens_outside_the_table_as_they_are() -> None:
    g = torch.Generator().manual_seed(10)
    op, reference = fused("rotary_embedding")
    table = rotary_cos_sin_cache(16, 32, device=NPU)
    positions = torch.tensor([3, -1, 16, 15, -17], device=NPU)
    query, key = randn(g, 5, 4, 32, dtype=torch.float32), randn(g, 5, 2, 32, dtype=torch.float32)
    before = (query.cpu(), key.cpu())
    op(positions, query, key, table)
    assert reference.calls == []
    inside = torch.tensor([0, 3])
    expected = [t[inside] for t in before]
    rotary_embedding(torch.tensor([3, 15]), expected[0], expected[1], table.cpu())
    for got, original, rotated in zip((query, key), before, expected, strict=True):
        assert torch.equal(got.cpu()[[1, 2, 4]], original[[1, 2, 4]])
        close(got[inside.to(NPU)], rotated.double(), torch.float32)


def _h(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.ones(shape, dtype=dtype, device=NPU)


def _decode(
    cache_dtype: torch.dtype = torch.float16,
    cache: tuple[int, ...] = (6, 2, 4, 2, 16),
    lens: tuple[int, int] = (5, 3),
    table: tuple[int, int, int] = (1, 2, 3),
    **kwargs: Any,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    tables = torch.tensor([table, (4, 5, 0)], dtype=torch.int32, device=NPU)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=NPU)
    kv_cache = torch.randn(cache).to(cache_dtype).to(NPU)
    return (torch.randn(2, 4, 16).half().to(NPU), kv_cache, tables, seq_lens, 0.25), kwargs


def _rotary(
    positions: torch.Tensor | None = None,
    query: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (
        torch.tensor([3, 5], device=NPU) if positions is None else positions,
        torch.randn(2, 4, 64).half().to(NPU) if query is None else query,
        torch.randn(2, 2, 64).half().to(NPU) if key is None else key,
        rotary_cos_sin_cache(16, 64, device=NPU),
    ), kwargs


def _kv_write(
    value_dtype: torch.dtype = torch.float16, slots: Any = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    cache = torch.zeros(4, 2, 4, 2, 8, dtype=torch.float16, device=NPU)
    slot_mapping = torch.tensor([0, 1], device=NPU) if slots is None else slots
    return (_h(2, 2, 8), _h(2, 2, 8, dtype=value_dtype), cache, slot_mapping), {}


def _aliased(make: Callable[[torch.Tensor], tuple[Any, ...]], *shape: int) -> Any:
    """``make(x)``'s arguments, in which ``x`` is given twice."""
    return make(torch.randn(shape).half().to(NPU)), {}


REFUSED: dict[str, tuple[str, Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]]] = {
    "rms_norm x a list": ("rms_norm", lambda: (([[1.0, 2.0]], _h(2), 1e-6), {})),
    "rms_norm hidden size 0": ("rms_norm", lambda: ((_h(3, 0), _h(0), 1e-6), {})),
    "rms_norm eps -1": ("rms_norm", lambda: ((_h(3, 8), _h(8), -1.0), {})),
    "rms_norm eps nan": ("rms_norm", lambda: ((_h(3, 8), _h(8), float("nan")), {})),
    "rms_norm eps a str": ("rms_norm", lambda: ((_h(3, 8), _h(8), "x"), {})),
    "rms_norm weight size": ("rms_norm", lambda: ((_h(3, 8), _h(1), 1e-6), {})),
    "silu_and_mul width 0": ("silu_and_mul", lambda: ((_h(3, 0),), {})),
    "silu_and_mul x None": ("silu_and_mul", lambda: ((None,), {})),
    "fused_add weight size": ("fused_add_rms_norm", lambda: ((_h(3, 8), _h(3, 8), _h(1)), {})),
    "fused_add eps -1": ("fused_add_rms_norm", lambda: ((_h(3, 8), _h(3, 8), _h(8), -1.0), {})),
    "fused_add x expanded": (
        "fused_add_rms_norm",
        lambda: ((_h(1, 8).expand(4, 8), torch.randn(4, 8).half().to(NPU), _h(8)), {}),
    ),
    "fused_add residual is x": (
        "fused_add_rms_norm",
        lambda: _aliased(lambda x: (x, x, _h(8)), 4, 8),
    ),
    "rotary float positions": ("rotary_embedding", lambda: _rotary(_h(2, dtype=torch.float32))),
    "rotary is_neox an int": ("rotary_embedding", lambda: _rotary(is_neox=1)),
    "rotary key expanded": ("rotary_embedding", lambda: _rotary(key=_h(1, 2, 64).expand(2, 2, 64))),
    "rotary query is key": (
        "rotary_embedding",
        lambda: _aliased(lambda x: _rotary(query=x, key=x)[0], 2, 2, 64),
    ),
    "kv_write float slots": ("kv_cache_write", lambda: _kv_write(slots=_h(2, dtype=torch.float32))),
    "kv_write slots a list": ("kv_cache_write", lambda: _kv_write(slots=[0, 1])),
    "kv_write slots 2-D": (
        "kv_cache_write",
        lambda: _kv_write(slots=torch.tensor([[0], [1]], device=NPU)),
    ),
    "kv_write value fp32": ("kv_cache_write", lambda: _kv_write(value_dtype=torch.float32)),
    "decode out fp32": (
        "paged_attention_decode",
        lambda: _decode(out=_h(2, 4, 16, dtype=torch.float32)),
    ),
    "decode cache bf16": ("paged_attention_decode", lambda: _decode(cache_dtype=torch.bfloat16)),
    "decode length past the row": ("paged_attention_decode", lambda: _decode(lens=(13, 3))),
    "decode page outside": (
        "paged_attention_decode",
        lambda: _decode(table=(1, 2, 7), lens=(12, 3)),
    ),
    "decode page -1": ("paged_attention_decode", lambda: _decode(table=(1, -1, 3), lens=(8, 3))),
    "decode cache 4-D": ("paged_attention_decode", lambda: _decode(cache=(12, 4, 2, 16))),
    "decode scale nan": (
        "paged_attention_decode",
        lambda: ((*_decode()[0][:4], float("nan")), {}),
    ),
}
"""Calls each fused op refuses, as its reference does, before it writes anything."""


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_call_changes_nothing(backend: Provider, case: str) -> None:
    name, make = REFUSED[case]
    args, kwargs = make()
    tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
    before = [x.cpu().clone() for x in tensors]
    with pytest.raises(InvalidArgumentError) as caught:
        backend.get_kernel(name)(*args, **kwargs)
    assert caught.value.hint
    for tensor, original in zip(tensors, before, strict=True):
        assert torch.equal(tensor.cpu(), original)


def test_the_provider_uses_each_operator_its_soc_runs(backend: Provider) -> None:
    registered = {spec.name for spec in backend.list_kernels()}
    for name in registered & set(BY_NAME):
        spec = backend.kernel_spec(name)
        for dtype in (DType.FP16, DType.BF16, DType.FP32):
            spec.check(seed=11, dtype=dtype)  # the fused ops against the torch layer's references


def _impls(run_python: RunPython, **env: str) -> dict[str, bool]:
    """Which standard ops a fresh ascend provider serves with a fused operator."""
    code = (
        "from sagellm_backend.torch_backend.cpu import create_cpu_backend\n"
        "from sagellm_backend_ascend import create_ascend_backend\n"
        "from sagellm_backend_ascend.kernels import FUSED_OPS\n"
        "cpu = create_cpu_backend(num_blocks=4, host_num_blocks=4)\n"
        "references = {s.name: s.impl for s in cpu.list_kernels()}\n"
        "cpu.close()\n"
        "npu = create_ascend_backend(num_blocks=4, host_num_blocks=4, pin_host_memory=False,\n"
        "                            kv_dtype='fp16')\n"
        "for f in FUSED_OPS:\n"
        "    if f.name in references:\n"
        "        print(f.name, npu.get_kernel(f.name) is not references[f.name])\n"
    )
    result = run_python(code, **env)
    assert result.returncode == 0, result.stderr
    return {
        name: flag == "True" for name, flag in (ln.split() for ln in result.stdout.splitlines())
    }


@pytest.mark.parametrize(
    ("soc", "family"),
    [
        ("Ascend910B3", SocFamily.A2),
        ("Ascend310P3", SocFamily.P310),
        ("Ascend910B", SocFamily.UNKNOWN),  # a first-generation 910, no Atlas A2
    ],
)
def test_which_ops_are_fused_follows_the_soc(
    run_python: RunPython, soc: str, family: SocFamily
) -> None:
    served = _impls(run_python, FAKE_TORCH_NPU_SOC=soc)
    assert served and served == {name: family in BY_NAME[name].families for name in served}
    assert set(
        _impls(run_python, FAKE_TORCH_NPU_SOC=soc, FAKE_TORCH_NPU_FUSED_OPS="0").values()
    ) == {False}
