"""The torch layer's standard kernels: against float64 formulas written here, through a real
provider's KV cache, with unused memory poisoned, and refusing bad input without side effects."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

import torch
import torch.nn.functional as F

from sagellm_backend import (
    CapabilityDescriptor,
    CapabilityError,
    DType,
    InvalidArgumentError,
    KernelExistsError,
    KernelNotFoundError,
)
from sagellm_backend.kernels import KernelTable
from sagellm_backend.mock.sampling import draw
from sagellm_backend.ops import KERNEL_OPS
from sagellm_backend.torch_backend.activations import silu_and_mul
from sagellm_backend.torch_backend.attention import (
    paged_attention_decode,
    paged_attention_prefill,
)
from sagellm_backend.torch_backend.cpu import create_cpu_backend
from sagellm_backend.torch_backend.cpu_device import HostEvent, HostStream
from sagellm_backend.torch_backend.kernels import register_reference_kernels
from sagellm_backend.torch_backend.kv_write import kv_cache_write
from sagellm_backend.torch_backend.norms import fused_add_rms_norm, rms_norm
from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend.torch_backend.references import sample_reference, uniform_reference
from sagellm_backend.torch_backend.rotary import rotary_cos_sin_cache, rotary_embedding
from sagellm_backend.torch_backend.sampling import sample, uniform_noise

SEEDS = (11, 12, 13)
TIGHT = 1e-12
NAN = float("nan")
Provider = TorchBackendProvider[HostStream, HostEvent]


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64)


# The registration table.


def test_the_table_registers_every_standard_kernel() -> None:
    table = KernelTable()
    register_reference_kernels(table, torch.device("cpu"))
    assert sorted(s.name for s in table.list()) == sorted(op.name for op in KERNEL_OPS)


@pytest.mark.parametrize("dtype", [DType.FP32, DType.FP16, DType.BF16], ids=str)
@pytest.mark.parametrize("name", [op.name for op in KERNEL_OPS])
def test_each_standard_kernel_matches_its_reference_on_four_shapes(name: str, dtype: DType) -> None:
    table = KernelTable()
    register_reference_kernels(table, torch.device("cpu"))
    spec = table.spec(name)
    assert spec.make_inputs is not None and dtype in spec.dtypes
    for seed in range(4):
        args, kwargs = spec.make_inputs(seed, dtype)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        assert all(a.dtype is not torch.float64 for a in tensors)
        spec.check(seed, dtype)


def test_checks_compare_what_in_place_ops_write() -> None:
    table = KernelTable()
    register_reference_kernels(table, torch.device("cpu"))
    with pytest.raises(KernelExistsError):
        register_reference_kernels(table, torch.device("cpu"))
    writes_nothing = table.spec("kv_cache_write")
    out_of_place = table.spec("rotary_embedding")
    for spec, impl in (
        (writes_nothing, lambda key, value, kv_cache, slot_mapping: None),
        (out_of_place, lambda p, q, k, c, is_neox=True: (q.clone(), k.clone())),
    ):
        table.register(
            spec.name,
            impl,
            reference=spec.reference,
            make_inputs=spec.make_inputs,
            compare=spec.compare,
            override=True,
        )
        with pytest.raises(AssertionError):
            table.spec(spec.name).check(1, DType.FP32)


# Lookup.


def test_the_lookup_follows_the_capability() -> None:
    table = KernelTable()
    register_reference_kernels(table, torch.device("cpu"))
    some = CapabilityDescriptor(supported_ops=["rms_norm", "sample"])
    assert table.get_op("rms_norm", some) is table.get("rms_norm")
    assert table.find_op("sample", some) is table.get("sample")
    with pytest.raises(CapabilityError, match="paged_attention_decode"):
        table.get_op("paged_attention_decode", some)
    assert table.find_op("paged_attention_decode", some) is None
    with pytest.raises(InvalidArgumentError, match="not a standard kernel op") as info:
        table.find_op("rms_nrom", some)
    assert info.value.hint == "did you mean 'rms_norm'?"
    with pytest.raises(InvalidArgumentError, match="provider method") as info:
        table.get_op("kv_cache", some)
    assert info.value.hint is not None and "kv_cache(layer" in info.value.hint
    with pytest.raises(KernelNotFoundError):
        KernelTable().get_op("rms_norm", some)


# Attention through a real provider: pages written by kv_cache_write, poisoned elsewhere.


@pytest.fixture
def p() -> Iterator[Provider]:
    provider: Provider = create_cpu_backend(
        num_layers=2,
        num_kv_heads=2,
        head_size=64,
        tokens_per_block=4,
        kv_dtype="fp32",
        num_blocks=48,
        host_num_blocks=4,
    )
    yield provider
    provider.close()


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """float64 causal SDPA of the last ``q`` tokens over ``k``, ``v`` (bottom-right aligned)."""
    m, heads, _ = q.shape
    length, kv_heads = k.shape[0], k.shape[1]
    if length == 0:
        return torch.zeros_like(q, dtype=torch.float64)
    k = k.double().repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
    v = v.double().repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
    visible = torch.ones(m, length, dtype=torch.bool).tril(length - m)
    out = F.scaled_dot_product_attention(
        q.double().transpose(0, 1), k, v, attn_mask=visible, scale=scale
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_attention_reads_only_live_slots_of_real_blocks(p: Provider, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    layout, heads, scale = p.kv_layout, 8, 0.125
    p.kv_block_alloc(3, "fp32")  # so that sequences do not start at page 0
    lengths = [0, *torch.randint(1, 30, (3,), generator=g).tolist()]
    blocks = [p.kv_block_info(b) for b in p.kv_blocks_alloc([max(n, 1) for n in lengths], "fp32")]
    assert all(b.device == p.device for b in blocks)
    cache = p.kv_cache(1, blocks[0].device)
    cache.fill_(NAN)  # every slot no sequence has written, page 0 included
    dense = []
    for block, length in zip(blocks, lengths, strict=True):
        k, v = randn(g, length, 2, 64).float(), randn(g, length, 2, 64).float()
        slots = torch.tensor(
            [layout.slot(block.pages, t) for t in range(length)], dtype=torch.int64
        )
        kv_cache_write(k, v, cache, slots)
        dense.append((k, v))
    width = max(b.num_pages for b in blocks) + 1
    tables = torch.tensor([[*b.pages, *[0] * (width - b.num_pages)] for b in blocks]).int()
    lens = torch.tensor(lengths).int()

    query = randn(g, 4, heads, 64).float()
    out = torch.full_like(query, NAN)
    got = paged_attention_decode(query, cache, tables, lens, scale, out=out)
    assert got is out
    for i, (k, v) in enumerate(dense):
        expected = dense_attention(query[i : i + 1], k, v, scale)[0]
        torch.testing.assert_close(got[i].double(), expected, rtol=1e-5, atol=1e-5)
    assert got[0].eq(0).all()

    # Prefill of the last new tokens of each sequence (chunked prefill over a cached prefix),
    # and padding rows after them.
    new = [min(n, q) for n, q in zip(lengths, [0, 1, 5, 30], strict=True)]
    starts = [0, *torch.tensor(new).cumsum(0).tolist()]
    queries = randn(g, starts[-1] + 2, heads, 64).float()
    got = paged_attention_prefill(
        queries, cache, tables, lens, torch.tensor(starts).int(), max(new), scale
    )
    for i, (k, v) in enumerate(dense):
        rows = queries[starts[i] : starts[i + 1]]
        expected = dense_attention(rows, k, v, scale)
        torch.testing.assert_close(
            got[starts[i] : starts[i + 1]].double(), expected, rtol=1e-5, atol=1e-5
        )
    assert got[starts[-1] :].eq(0).all()


def test_prefill_in_chunks_and_decode_agree_with_one_prefill(p: Provider) -> None:
    g = torch.Generator().manual_seed(5)
    length, heads = 23, 4
    block = p.kv_block_info(p.kv_block_alloc(length, "fp32"))
    assert block.num_pages == p.kv_layout.pages_for(length)
    cache = p.kv_cache(0, block.device)
    cache.fill_(NAN)
    slots = torch.tensor([p.kv_layout.slot(block.pages, t) for t in range(length)])
    kv_cache_write(randn(g, length, 2, 64).float(), randn(g, length, 2, 64).float(), cache, slots)
    table = torch.tensor([block.pages]).int()
    query = randn(g, length, heads, 64).float()

    def prefill(first: int, last: int) -> torch.Tensor:
        starts = torch.tensor([0, last - first]).int()
        lens = torch.tensor([last]).int()
        return paged_attention_prefill(query[first:last], cache, table, lens, starts, 32, 0.1)

    whole = prefill(0, length)
    torch.testing.assert_close(torch.cat([prefill(0, 9), prefill(9, length)]), whole)
    for t in (0, 7, length - 1):
        lens = torch.tensor([t + 1]).int()
        step = paged_attention_decode(query[t : t + 1], cache, table, lens, 0.1)
        torch.testing.assert_close(step[0], whole[t])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_attention_matches_fp32_of_the_same_values(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    cache = randn(g, 6, 2, 16, 1, 128).to(dtype)
    tables, lens = torch.tensor([[4, 2, 0], [1, 0, 0]]).int(), torch.tensor([33, 7]).int()
    query = randn(g, 2, 8, 128).to(dtype)
    got = paged_attention_decode(query, cache, tables, lens, 0.09)
    wide = paged_attention_decode(query.float(), cache.float(), tables, lens, 0.09)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), wide, rtol=1e-2, atol=1e-2)


def test_decode_reads_a_cache_that_is_a_strided_view() -> None:
    g = torch.Generator().manual_seed(4)
    every_other = randn(g, 12, 2, 8, 2, 64).float()[::2]  # 6 pages, not contiguous
    tables, lens = torch.tensor([[5, 1, 0], [2, 3, 4]]).int(), torch.tensor([9, 20]).int()
    query = randn(g, 2, 4, 64).float()
    got = paged_attention_decode(query, every_other, tables, lens, 0.125)
    expected = paged_attention_decode(query, every_other.contiguous(), tables, lens, 0.125)
    torch.testing.assert_close(got, expected)


def test_attention_refuses_bad_input_and_writes_nothing() -> None:
    cache = torch.zeros(4, 2, 4, 2, 8)
    query, tables = torch.ones(2, 4, 8), torch.tensor([[1, 2], [3, 99]]).int()
    lens = torch.tensor([8, 4]).int()
    out = torch.full((2, 4, 8), 7.0)
    good = (query, cache, tables, lens, 1.0)
    paged_attention_decode(*good)  # the unused entry 99 is never read
    cases: list[tuple[tuple[object, ...], str]] = [
        ((query[0], cache, tables, lens, 1.0), "query must be"),
        ((query.half(), cache, tables, lens, 1.0), "cache"),
        ((torch.ones(2, 3, 8), cache, tables, lens, 1.0), "not a multiple"),
        ((query, cache[..., :4], tables, lens, 1.0), "head size"),
        ((query, cache, tables.float(), lens, 1.0), "int32 or int64"),
        ((query, cache, tables, torch.tensor([9, 4]).int(), 1.0), "seq_lens\\[0\\] is 9"),
        ((query, cache, tables, torch.tensor([-1, 4]).int(), 1.0), "seq_lens\\[0\\] is -1"),
        (
            (query, cache, tables, torch.tensor([8, 5]).int(), 1.0),
            "entries within the sequences. lengths run 1..99",
        ),
        ((query, cache, tables, lens[:1], 1.0), "rows"),
        ((query, cache, tables, lens, math.inf), "scale"),
        ((query, cache[..., :0, :], tables, lens, 1.0), "0 KV heads"),
    ]
    for args, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            paged_attention_decode(*args, out=out)  # type: ignore[arg-type]
        assert out.eq(7).all()
    with pytest.raises(InvalidArgumentError, match="out is"):
        paged_attention_decode(*good, out=torch.ones(2, 4, 8).half())
    starts = torch.tensor([0, 2, 3]).int()
    queries = torch.ones(3, 4, 8)
    paged_attention_prefill(queries, cache, tables, lens, starts, 2, 1.0)
    for bad_starts, max_len, message in (
        (torch.tensor([1, 2, 3]).int(), 2, "from 0"),
        (torch.tensor([0, 2, 4]).int(), 2, "at most 3"),
        (torch.tensor([0, 2, 1]).int(), 2, "sequence 1 has -1"),
        (starts, 1, "max_query_len 1"),
        (starts, -1, "max_query_len must be"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            paged_attention_prefill(queries, cache, tables, lens, bad_starts, max_len, 1.0)
    zero = torch.tensor([8, 0]).int()
    with pytest.raises(InvalidArgumentError, match="sequence 1 has 1 new tokens, 0"):
        paged_attention_prefill(queries, cache, tables, zero, starts, 2, 1.0)


# kv_cache_write.


def test_kv_cache_write_skips_padding_and_refuses_slots_outside() -> None:
    g = torch.Generator().manual_seed(2)
    cache = randn(g, 3, 2, 4, 2, 8).float()
    before = cache.clone()
    key, value = randn(g, 3, 2, 8).float(), randn(g, 3, 2, 8).float()
    kv_cache_write(key, value, cache, torch.tensor([5, -1, 11]))
    expected = before.clone()
    expected[1, 0, 1], expected[1, 1, 1] = key[0], value[0]
    expected[2, 0, 3], expected[2, 1, 3] = key[2], value[2]
    assert torch.equal(cache, expected)
    for slots in ([5, 12, 0], [5, -2, 0]):
        with pytest.raises(InvalidArgumentError, match="slot_mapping holds slots"):
            kv_cache_write(key, value, cache, torch.tensor(slots, dtype=torch.int32))
        assert torch.equal(cache, expected)
    for args, message in (
        ((key.half(), value, cache, torch.tensor([0, 1, 2])), "key is"),
        ((key, value[:, :1], cache, torch.tensor([0, 1, 2])), "value is"),
        ((key, value, cache, torch.tensor([0, 1])), "rows"),
        ((key, value, cache, torch.tensor([0.0, 1.0, 2.0])), "int32 or int64"),
        ((key, value, cache[:, :1], torch.tensor([0, 1, 2])), "K and V"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            kv_cache_write(*args)
        assert torch.equal(cache, expected)
    kv_cache_write(key[:0], value[:0], cache, torch.tensor([], dtype=torch.int64))
    assert torch.equal(cache, expected)


# sample.

EXTREME_SEEDS = [0, 1, -1, 2**63 - 1, -(2**63), 0x9E3779B97F4A7C15 - 2**64, 123456789]


def test_the_noise_is_the_shared_splitmix64_function() -> None:
    seeds = torch.tensor(EXTREME_SEEDS, dtype=torch.int64)
    got = uniform_noise(seeds, 70)
    for i, seed in enumerate(EXTREME_SEEDS):
        for j in (0, 1, 2, 33, 69):
            assert float(got[i, j]) == uniform_reference(seed, j)
    assert bool(((got > 0) & (got < 1)).all())
    # seeds 1 and 2 at token 0 are splitmix64's first two outputs from state 0
    for seed, output in ((1, 0xE220A8397B1DCDAF), (2, 0x6E789E6AA1B965F4)):
        assert float(uniform_noise(torch.tensor([seed]), 1)) == ((output >> 11) + 0.5) * 2.0**-53


def test_sample_greedy_ties_and_filters() -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 4.9, 4.8, -1.0], [0.0, 0.0, 9.0, 0.0]])
    one = torch.ones(3)
    seeds = torch.tensor([1, 2, 3])
    greedy = sample(logits, torch.zeros(3), torch.zeros(3, dtype=torch.int64), one, seeds)
    assert greedy.tolist() == [1, 0, 2] and greedy.dtype == torch.int64
    for s in range(20):
        row_seeds = torch.tensor([s, s + 100, s + 200])
        top1 = sample(logits, one * 2, torch.ones(3, dtype=torch.int64), one, row_seeds)
        assert top1.tolist() == [1, 0, 2]
        tiny_p = sample(logits, one * 2, torch.zeros(3, dtype=torch.int64), one * 1e-6, row_seeds)
        assert tiny_p.tolist() == [1, 0, 2]
        top2 = sample(logits, one, torch.full((3,), 2), one, row_seeds)
        assert top2[0] in (1, 2) and top2[1] in (0, 1)


def test_sample_draws_from_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 4000
    logits, seeds = probs.log().repeat(rows, 1), torch.arange(rows) * 7919 - 10**12
    plain = (torch.ones(rows), torch.zeros(rows, dtype=torch.int64), torch.ones(rows))
    tokens = sample(logits, *plain, seeds)
    freq = torch.bincount(tokens, minlength=4).double() / rows
    assert torch.allclose(freq, probs.double(), atol=0.03), freq
    # the same seeds and logits give the same tokens, in any batch
    temperature, top_k, top_p = (t[-50:] for t in plain)
    again = sample(logits[-50:], temperature, top_k, top_p, seeds[-50:])
    assert torch.equal(again, tokens[-50:])


def test_sample_at_extremes_agrees_with_the_mock_and_the_float64_reference() -> None:
    """Tiny temperatures and logits near float32's limit neither overflow nor lose the draw;
    ``-inf`` masks a token; a row without a finite logit still gives an id in range."""
    inf = math.inf
    rows = [
        ([100.0, 300.0, 200.0], 1e-37),
        ([-3e38, 3e38, 0.0], 0.5),
        ([3e38, 3e38, -3e38], 1e-30),
        ([-inf, 2.0, -inf, 1.0], 1.0),
        ([-inf, -inf, 5.0, -inf], 1e-3),
    ]
    for seed in range(40):
        for row, temperature in rows:
            args = (
                torch.tensor([row]),
                torch.tensor([temperature]),
                torch.zeros(1, dtype=torch.int64),
                torch.ones(1),
                torch.tensor([seed]),
            )
            expected = int(sample_reference(*args)[0])
            assert row[expected] > -inf
            assert int(sample(*args)[0]) == expected, (row, temperature, seed)
            assert draw(row, temperature, 0, 1.0, seed) == expected, (row, temperature, seed)
    for row in ([math.nan, 3.0, 2.0], [1.0, inf, 2.0], [-inf] * 3):
        odd = (torch.tensor([row]), torch.ones(1), torch.zeros(1).long(), torch.ones(1))
        assert 0 <= int(sample(*odd, torch.tensor([7]))[0]) < 3
        assert 0 <= draw(row, 1.0, 0, 1.0, 7) < 3


def test_sample_refuses_bad_input() -> None:
    logits, t, k = torch.randn(2, 5), torch.ones(2), torch.zeros(2).long()
    p, s = torch.ones(2), torch.arange(2)
    for args, message in (
        ((logits, -t, k, p, s), "temperature"),
        ((logits, t * math.inf, k, p, s), "temperature"),
        ((logits, t, k - 1, p, s), "top_k"),
        ((logits, t, k, p * 0, s), "top_p"),
        ((logits, t, k, p * 2, s), "top_p"),
        ((logits, t, k, p, s.float()), "int32 or int64"),
        ((logits, t[:1], k, p, s), "rows"),
        ((logits[0], t, k, p, s), "logits must be"),
        ((logits[:, :0], t, k, p, s), "vocab 0"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            sample(*args)


# rotary, norms, activation: float64 formulas element by element.


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("seed", SEEDS)
def test_rotary_embedding_in_float64_in_place(is_neox: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rot, base, d = 8, 10000.0, 12  # partial: features 8..11 stay as they are
    positions = torch.randint(0, 100, (5,), generator=g)
    query, key = randn(g, 5, 3, d), randn(g, 5, 1, d)
    original_q, original_k = query.clone(), key.clone()
    cache = rotary_cos_sin_cache(100, rot, base, dtype="fp32")
    assert cache.dtype == torch.float32 and cache.shape == (100, rot)
    got_q, got_k = rotary_embedding(positions, query, key, cache.double(), is_neox=is_neox)
    assert got_q is query and got_k is key
    for x, got in ((original_q, query), (original_k, key)):
        expected = x.clone()
        for t, pos in enumerate(positions.tolist()):
            for i in range(rot // 2):
                angle = pos * base ** (-2 * i / rot)
                first, second = (i, rot // 2 + i) if is_neox else (2 * i, 2 * i + 1)
                a, b = x[t, :, first], x[t, :, second]
                expected[t, :, first] = a * math.cos(angle) - b * math.sin(angle)
                expected[t, :, second] = b * math.cos(angle) + a * math.sin(angle)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(got[..., rot:], x[..., rot:])


def test_rotary_refuses_bad_input_and_changes_nothing() -> None:
    cache = rotary_cos_sin_cache(16, 8)
    query, key = torch.ones(3, 2, 8), torch.ones(3, 1, 8)
    for args, message in (
        ((torch.tensor([0, 1, 16]), query, key, cache), "positions run 0..16"),
        ((torch.tensor([0, 1, -1]), query, key, cache), "positions run -1..1"),
        ((torch.tensor([0, 1, 2]), query, key, rotary_cos_sin_cache(16, 10)), "cannot rotate"),
        ((torch.tensor([0, 1]), query, key, cache), "rows"),
        ((torch.tensor([0, 1, 2]), query, key.half(), cache), "cannot rotate"),
        ((torch.tensor([0, 1, 2]), query, torch.ones(1, 1, 8).expand(3, 1, 8), cache), "expanded"),
        ((torch.tensor([0, 1, 2]), query, query[:, :1], cache), "one address"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            rotary_embedding(*args)
        assert query.eq(1).all() and key.eq(1).all()
    for args2, message in (((0, 8), "max_position"), ((8, 7), "even"), ((8, 8, 1.0), "base")):
        with pytest.raises(InvalidArgumentError, match=message):
            rotary_cos_sin_cache(*args2)


@pytest.mark.parametrize("seed", SEEDS)
def test_norms_and_activation_in_float64(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, residual, w = randn(g, 5, 64), randn(g, 5, 64), randn(g, 64)
    summed = x + residual
    expected = torch.empty_like(x)
    for i in range(5):
        rms = math.sqrt(sum(float(v) ** 2 for v in summed[i]) / 64 + 1e-6)
        expected[i] = torch.tensor(
            [float(summed[i, j]) / rms * float(w[j]) for j in range(64)], dtype=torch.float64
        )
    torch.testing.assert_close(rms_norm(summed, w, 1e-6), expected, rtol=TIGHT, atol=TIGHT)
    got_x, got_r = fused_add_rms_norm(x, residual, w, 1e-6)
    assert got_x is x and got_r is residual
    torch.testing.assert_close(residual, summed, rtol=TIGHT, atol=TIGHT)
    torch.testing.assert_close(x, expected, rtol=TIGHT, atol=TIGHT)

    gate_up = randn(g, 4, 2 * 16)
    act = torch.tensor(
        [
            [
                float(gate_up[i, j])
                / (1 + math.exp(-float(gate_up[i, j])))
                * float(gate_up[i, 16 + j])
                for j in range(16)
            ]
            for i in range(4)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(silu_and_mul(gate_up), act, rtol=TIGHT, atol=TIGHT)


def test_norms_and_activation_refuse_bad_input_and_change_nothing() -> None:
    x, residual, w = torch.ones(2, 4), torch.full((2, 4), 2.0), torch.ones(4)
    for call, message in (
        (lambda: rms_norm(x, torch.ones(3)), "weight has 3 features"),
        (lambda: rms_norm(x, w, -1.0), "eps must be at least"),
        (lambda: fused_add_rms_norm(x, residual.half(), w), "residual is"),
        (lambda: fused_add_rms_norm(x, x, w), "shares memory"),
        (lambda: fused_add_rms_norm(torch.ones(1, 4).expand(2, 4), residual, w), "expanded"),
        (lambda: fused_add_rms_norm(x, torch.full((1, 4), 2.0).expand(2, 4), w), "expanded"),
        (lambda: fused_add_rms_norm(x, residual[:1], w), "residual is"),
        (lambda: silu_and_mul(torch.ones(2, 3)), "even"),
        (lambda: silu_and_mul(torch.ones(2, 4).long()), "floating"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            call()
        assert x.eq(1).all() and residual.eq(2).all()
    shared = torch.arange(24.0).view(6, 4)
    before = shared.clone()
    with pytest.raises(InvalidArgumentError, match="shares memory"):
        fused_add_rms_norm(shared[2:6], shared[0:4], w)  # overlapping views of one buffer
    assert torch.equal(shared, before)
