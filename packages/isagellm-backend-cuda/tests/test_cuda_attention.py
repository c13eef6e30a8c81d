"""The Triton paged attention against a float64 reference, on fresh random caches.

Every cache slot no sequence owns (the tail of each last page, spare pages, block table columns
past a sequence's pages) holds NaN, and every output starts as NaN: a kernel that reads a slot
it must not, or leaves an element unwritten, fails. On a machine with a GPU the tests run there;
without one, under Triton's interpreter on the CPU (``TRITON_INTERPRET=1`` is set before the
kernels are imported), with small shapes. Tests marked ``gpu`` run model-sized shapes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import pytest

pytest.importorskip("torch", reason="the kernels need torch")
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported
pytest.importorskip("triton", reason="the kernels need triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from sagellm_backend.errors import InvalidArgumentError  # noqa: E402
from sagellm_backend_cuda.attention import (  # noqa: E402
    DecodeTiles,
    PrefillTiles,
    decode_splits,
    paged_attention_decode,
    paged_attention_prefill,
)

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _repair_interpreter() -> None:
    """Fill two gaps of Triton 3.6's interpreter that these kernels meet (not the GPU's path).

    It holds scalars as 1-element arrays, which NumPy 2 will not turn into the bounds of a
    ``range`` loop through ``int()``; and its ``tl.dot`` multiplies bf16 operands as their raw
    16-bit patterns. Scalars are read with ``.item()`` and bf16 operands widened to fp32.
    """
    patch_tensor = interpreter._patch_lang_tensor
    create_dot = interpreter.InterpreterBuilder.create_dot

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    def widen(x: Any) -> Any:
        if x.dtype != tl.bfloat16:
            return x
        bits = x.data.astype("uint32") << 16
        return interpreter.TensorHandle(bits.view("float32"), tl.float32)

    def dot(self: Any, a: Any, b: Any, d: Any, precision: Any, imprecise: Any) -> Any:
        return create_dot(self, widen(a), widen(b), d, precision, imprecise)

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter.InterpreterBuilder.create_dot = dot


if not ON_GPU:
    _repair_interpreter()


@dataclass
class Batch:
    """A paged cache with NaN wherever no sequence's tokens are, and each sequence's tables."""

    cache: torch.Tensor
    tables: torch.Tensor
    seq_lens: torch.Tensor
    heads: int


def _batch(
    g: torch.Generator,
    lengths: list[int],
    *,
    heads: int,
    kv_heads: int,
    head_size: int,
    tokens: int,
    dtype: torch.dtype,
    spare_columns: int = 1,
) -> Batch:
    used = [math.ceil(n / tokens) for n in lengths]
    width = max(used, default=0) + spare_columns
    spare = 3
    num_pages = sum(used) + spare
    order = torch.randperm(num_pages, generator=g).tolist()
    poisoned = order[sum(used) :]
    cache = torch.full((num_pages, 2, tokens, kv_heads, head_size), math.nan, dtype=torch.float64)
    tables = torch.empty((len(lengths), width), dtype=torch.int32)
    for i, (n, pages) in enumerate(zip(lengths, used, strict=True)):
        own, order = order[:pages], order[pages:]
        filler = torch.randint(0, spare, (width - pages,), generator=g)
        tables[i] = torch.tensor(own + [poisoned[int(j)] for j in filler], dtype=torch.int32)
        for slot in range(n):
            page, offset = own[slot // tokens], slot % tokens
            cache[page, :, offset] = torch.randn((2, kv_heads, head_size), generator=g)
    return Batch(
        cache.to(dtype=dtype, device=DEVICE),
        tables.to(DEVICE),
        torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
        heads,
    )


def _reference(batch: Batch, query: torch.Tensor, starts: list[int], scale: float) -> torch.Tensor:
    """Causal attention in float64, each sequence on its own; a length of 0 gives zeros."""
    cache = batch.cache.double().cpu()
    tokens, kv_heads, head_size = cache.shape[2:]
    group = batch.heads // kv_heads
    out = torch.zeros(query.shape, dtype=torch.float64)
    for i, length in enumerate(batch.seq_lens.tolist()):
        first, last = starts[i], starts[i + 1]
        if last == first or length == 0:
            continue
        pages = batch.tables[i, : math.ceil(length / tokens)].long().cpu()
        keys = cache[pages, 0].reshape(-1, kv_heads, head_size)[:length]
        values = cache[pages, 1].reshape(-1, kv_heads, head_size)[:length]
        q = query[first:last].double().cpu().view(last - first, kv_heads, group, head_size)
        scores = torch.einsum("qkgd,lkd->kgql", q, keys) * scale
        positions = length - (last - first) + torch.arange(last - first)
        hidden = torch.arange(length)[None, :] > positions[:, None]
        weights = scores.masked_fill(hidden, -math.inf).softmax(dim=-1)
        out[first:last] = torch.einsum("kgql,lkd->qkgd", weights, values).reshape(
            q.shape[0], -1, head_size
        )
    return out


def _assert_matches(result: torch.Tensor, expected: torch.Tensor) -> None:
    assert not result.isnan().any(), "an output element was left unwritten or read a poisoned slot"
    tol = TOLERANCE[result.dtype]
    torch.testing.assert_close(result.double().cpu(), expected, rtol=tol, atol=tol)


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (heads, kv_heads, head_size, tokens_per_block, splits, tiles): GQA 4:1, MQA, a group of 16.
DECODE_CASES = [
    (8, 2, 64, 16, 1, DecodeTiles(block_n=16)),
    (8, 2, 128, 32, 3, DecodeTiles(block_n=32)),
    (4, 1, 64, 32, 5, DecodeTiles(block_n=16)),
    (16, 1, 128, 16, 2, None),
    (8, 2, 64, 16, None, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c[:5])))
def test_decode_matches_the_float64_reference(dtype: torch.dtype, case: tuple[Any, ...]) -> None:
    heads, kv_heads, head_size, tokens, splits, tiles = case
    g = torch.Generator().manual_seed(hash((str(dtype), *case[:5])) % 2**31)
    lengths = [int(n) for n in torch.randint(1, 3 * tokens, (4,), generator=g)]
    lengths[1] = 0
    batch = _batch(
        g, lengths, heads=heads, kv_heads=kv_heads, head_size=head_size, tokens=tokens, dtype=dtype
    )
    query = _randn(g, len(lengths), heads, head_size, dtype=dtype)
    out = torch.full_like(query, math.nan)
    scale = head_size**-0.5
    result = paged_attention_decode(
        query,
        batch.cache,
        batch.tables,
        batch.seq_lens,
        scale,
        out=out,
        num_splits=splits,
        tiles=tiles,
    )
    assert result is out
    _assert_matches(result, _reference(batch, query, list(range(len(lengths) + 1)), scale))
    assert not result[1].any(), "a sequence of length 0 gets zeros"


# (heads, kv_heads, head_size, tokens_per_block, tiles)
PREFILL_CASES = [
    (8, 2, 64, 16, PrefillTiles(block_m=16, block_n=16, num_warps=4)),
    (4, 1, 128, 32, PrefillTiles(block_m=16, block_n=32, num_warps=4)),
    (4, 1, 64, 16, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "-".join(map(str, c[:4])))
def test_chunked_prefill_matches_the_float64_reference(
    dtype: torch.dtype, case: tuple[Any, ...]
) -> None:
    heads, kv_heads, head_size, tokens, tiles = case
    g = torch.Generator().manual_seed(hash((str(dtype), *case[:4])) % 2**31)
    # (cached prefix, new tokens): a prefill, chunks over a prefix, a decode, nothing new.
    shapes = [(0, 37), (int(torch.randint(1, 40, (1,), generator=g)), 21), (45, 1), (0, 0), (9, 0)]
    lengths = [cached + new for cached, new in shapes]
    starts = [0]
    for _, new in shapes:
        starts.append(starts[-1] + new)
    batch = _batch(
        g, lengths, heads=heads, kv_heads=kv_heads, head_size=head_size, tokens=tokens, dtype=dtype
    )
    query = _randn(g, starts[-1], heads, head_size, dtype=dtype)
    out = torch.full_like(query, math.nan)
    scale = 0.7 * head_size**-0.5
    result = paged_attention_prefill(
        query,
        batch.cache,
        batch.tables,
        batch.seq_lens,
        torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        max(new for _, new in shapes),
        scale,
        out=out,
        tiles=tiles,
    )
    assert result is out
    _assert_matches(result, _reference(batch, query, starts, scale))


def test_prefill_of_one_token_per_sequence_is_decode() -> None:
    g = torch.Generator().manual_seed(11)
    lengths = [5, 0, 40, 17]
    batch = _batch(g, lengths, heads=8, kv_heads=2, head_size=64, tokens=16, dtype=torch.float16)
    query = _randn(g, len(lengths), 8, 64, dtype=torch.float16)
    starts = torch.arange(len(lengths) + 1, dtype=torch.int32, device=DEVICE)
    decoded = paged_attention_decode(query, batch.cache, batch.tables, batch.seq_lens, 0.125)
    prefilled = paged_attention_prefill(
        query, batch.cache, batch.tables, batch.seq_lens, starts, 1, 0.125
    )
    prefilled[1] = 0  # prefill's length-0 sequence: a causal row that sees no key
    torch.testing.assert_close(decoded, prefilled, rtol=2e-3, atol=2e-3)


def test_decode_of_an_empty_batch_and_of_only_empty_sequences() -> None:
    g = torch.Generator().manual_seed(3)
    batch = _batch(g, [0, 0], heads=4, kv_heads=1, head_size=64, tokens=16, dtype=torch.bfloat16)
    query = _randn(g, 2, 4, 64, dtype=torch.bfloat16)
    out = paged_attention_decode(
        query, batch.cache, batch.tables, batch.seq_lens, 0.1, out=torch.full_like(query, math.nan)
    )
    assert torch.equal(out, torch.zeros_like(out))
    empty = paged_attention_decode(
        query[:0], batch.cache, batch.tables[:0], batch.seq_lens[:0], 0.1
    )
    assert empty.shape == (0, 4, 64)


@pytest.mark.parametrize(
    ("programs", "max_tokens", "expected"),
    [(512, 2048, 1), (2048, 512, 1), (32, 32768, 9), (4, 64, 1), (8, 4096, 8), (1, 1 << 20, 64)],
)
def test_decode_splits_only_what_does_not_fill_the_gpu(
    programs: int, max_tokens: int, expected: int
) -> None:
    assert decode_splits(programs, max_tokens, 132) == expected


def _valid_decode_args() -> dict[str, Any]:
    return {
        "query": torch.zeros(2, 4, 64, dtype=torch.float16, device=DEVICE),
        "kv_cache": torch.zeros(4, 2, 16, 2, 64, dtype=torch.float16, device=DEVICE),
        "block_tables": torch.zeros(2, 2, dtype=torch.int32, device=DEVICE),
        "seq_lens": torch.ones(2, dtype=torch.int32, device=DEVICE),
        "scale": 0.125,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"query": torch.zeros(2, 4, 64, dtype=torch.float64)}, "float16, bfloat16 or float32"),
        ({"query": torch.zeros(2, 64, dtype=torch.float16)}, r"\[tokens, heads, head_size\]"),
        ({"kv_cache": torch.zeros(4, 2, 16, 2, 64, dtype=torch.bfloat16)}, "one layer's"),
        ({"kv_cache": torch.zeros(4, 16, 2, 64, dtype=torch.float16)}, "one layer's"),
        ({"query": torch.zeros(2, 4, 96, dtype=torch.float16)}, "head sizes"),
        ({"query": torch.zeros(2, 3, 64, dtype=torch.float16)}, "multiple of"),
        ({"block_tables": torch.zeros(2, 2, dtype=torch.int64)}, "block_tables must be int32"),
        ({"seq_lens": torch.ones(2, 1, dtype=torch.int32)}, r"seq_lens must be int32"),
        ({"seq_lens": torch.ones(3, dtype=torch.int32)}, "one length per sequence"),
        ({"scale": math.nan}, "finite"),
        ({"scale": True}, "finite"),
        ({"block_tables": [[0, 1], [2, 3]]}, "must be a torch.Tensor"),
        ({"out": torch.zeros(2, 4, 32, dtype=torch.float16)}, "out must be"),
        ({"num_splits": 0}, "num_splits"),
    ],
)
def test_decode_refuses_bad_arguments_before_writing(change: dict[str, Any], message: str) -> None:
    args = _valid_decode_args()
    args["out"] = torch.full_like(args["query"], math.nan)
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(InvalidArgumentError, match=message) as caught:
        paged_attention_decode(**args)
    assert caught.value.hint
    if args["out"].shape == args["query"].shape:
        assert args["out"].isnan().all(), "a refused call wrote its output"


@pytest.mark.skipif(not ON_GPU, reason="two devices of one kind are only told apart on a GPU")
def test_decode_refuses_tensors_on_another_device() -> None:
    args = _valid_decode_args()
    args["block_tables"] = args["block_tables"].cpu()
    with pytest.raises(InvalidArgumentError, match="block_tables is on cpu"):
        paged_attention_decode(**args)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"query_start_loc": torch.tensor([0, 1], dtype=torch.int32)}, r"int32 \[3\]"),
        ({"query_start_loc": torch.tensor([0, 1, 2])}, r"int32 \[3\]"),
        ({"max_query_len": -1}, "non-negative int"),
        ({"max_query_len": True}, "non-negative int"),
        ({"block_tables": torch.zeros(3, 2, dtype=torch.int32)}, "block table rows"),
    ],
)
def test_prefill_refuses_bad_arguments(change: dict[str, Any], message: str) -> None:
    args = _valid_decode_args()
    args["query_start_loc"] = torch.tensor([0, 1, 2], dtype=torch.int32)
    args["max_query_len"] = 1
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(InvalidArgumentError, match=message):
        paged_attention_prefill(**args)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DecodeTiles(block_n=48),
        lambda: DecodeTiles(block_n=0),
        lambda: DecodeTiles(num_warps=3),
        lambda: DecodeTiles(num_stages=0),
        lambda: PrefillTiles(block_m=8),
        lambda: PrefillTiles(block_n=True),
    ],
)
def test_tiles_refuse_shapes_no_launch_can_take(make: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="Tiles"):
        make()


# Model-sized shapes, on the GPU only.


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="model-sized shapes need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_size"), [(32, 8, 128), (32, 8, 64), (16, 1, 128)]
)
def test_decode_of_long_sequences_on_the_gpu(
    dtype: torch.dtype, heads: int, kv_heads: int, head_size: int
) -> None:
    g = torch.Generator().manual_seed(heads + head_size)
    lengths = [int(n) for n in torch.randint(1, 5000, (6,), generator=g)]
    lengths[2] = 0
    batch = _batch(
        g, lengths, heads=heads, kv_heads=kv_heads, head_size=head_size, tokens=16, dtype=dtype
    )
    query = _randn(g, len(lengths), heads, head_size, dtype=dtype)
    expected = _reference(batch, query, list(range(len(lengths) + 1)), head_size**-0.5)
    for splits in (None, 1, 7):
        out = torch.full_like(query, math.nan)
        paged_attention_decode(
            query,
            batch.cache,
            batch.tables,
            batch.seq_lens,
            head_size**-0.5,
            out=out,
            num_splits=splits,
        )
        _assert_matches(out, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="model-sized shapes need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("head_size", "tokens"), [(128, 16), (64, 32)])
def test_chunked_prefill_of_long_sequences_on_the_gpu(
    dtype: torch.dtype, head_size: int, tokens: int
) -> None:
    g = torch.Generator().manual_seed(head_size + tokens)
    shapes = [(0, 700), (1500, 300), (333, 1), (2000, 129), (0, 0)]
    lengths = [c + n for c, n in shapes]
    starts = [0]
    for _, new in shapes:
        starts.append(starts[-1] + new)
    batch = _batch(
        g, lengths, heads=32, kv_heads=8, head_size=head_size, tokens=tokens, dtype=dtype
    )
    query = _randn(g, starts[-1], 32, head_size, dtype=dtype)
    out = torch.full_like(query, math.nan)
    paged_attention_prefill(
        query,
        batch.cache,
        batch.tables,
        batch.seq_lens,
        torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        700,
        head_size**-0.5,
        out=out,
    )
    _assert_matches(out, _reference(batch, query, starts, head_size**-0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the cuda backend needs a CUDA GPU")
def test_the_cuda_backend_registers_the_kernels_over_the_reference() -> None:
    from sagellm_backend_cuda import create_cuda_backend

    provider = create_cuda_backend(
        None,
        num_layers=1,
        num_kv_heads=2,
        head_size=64,
        tokens_per_block=16,
        kv_dtype="bf16",
        num_blocks=8,
        host_num_blocks=8,
    )
    try:
        assert provider.get_kernel("paged_attention_decode") is paged_attention_decode
        assert provider.get_kernel("paged_attention_prefill") is paged_attention_prefill
        for name in ("paged_attention_decode", "paged_attention_prefill"):
            spec = provider.kernel_spec(name)
            if spec.checkable:
                for dtype in sorted(spec.dtypes):
                    for seed in range(3):
                        spec.check(seed, dtype)
    finally:
        provider.close()
