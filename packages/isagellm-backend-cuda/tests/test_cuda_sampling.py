"""The Triton ``sample`` against a float64 implementation of the op's definition.

Without a GPU the kernels run under Triton's interpreter on the CPU (``TRITON_INTERPRET=1`` is
set before Triton is imported) on small vocabularies; the tests marked ``gpu`` run the
benchmark's shapes on the GPU.
"""

from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("torch", reason="the kernels need torch")
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported
pytest.importorskip("triton", reason="the kernels need triton")

from sagellm_backend.errors import InvalidArgumentError  # noqa: E402
from sagellm_backend_cuda.sampling import _sample, sample  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (ran in the interpreter)")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values read as unsigned."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def exponential_noise(seed: int, vocab: int) -> torch.Tensor:
    """``-log(u_j)`` of the shared noise for one row, in float64 (int64 arithmetic wraps)."""
    z = torch.tensor(_signed(seed % (1 << 64)), dtype=torch.int64) * _signed(0x9E3779B97F4A7C15)
    z = z + torch.arange(vocab, dtype=torch.int64)
    z = (z ^ _shift(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shift(z, 27)) * _signed(0x94D049BB133111EB)
    z = z ^ _shift(z, 31)
    return -torch.log((_shift(z, 11).double() + 0.5) * 2.0**-53)


def allowed_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> list[int]:
    """The tokens a sampling row may draw, most likely first: top-k, then top-p of those."""
    scaled = logits.double() / temperature
    vocab = scaled.numel()
    order = sorted(range(vocab), key=lambda j: (-float(scaled[j]), j))
    if 0 < top_k < vocab:
        order = order[:top_k]
    if top_p < 1.0:
        weights = torch.softmax(scaled, dim=0)[order]
        weights = weights / weights.sum()
        before = torch.cumsum(weights, 0) - weights
        order = [j for j, b in zip(order, before.tolist(), strict=True) if b < top_p] or order[:1]
    return order


def reference_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
) -> list[int]:
    """The op's definition in float64, row by row."""
    tokens = []
    for i in range(logits.shape[0]):
        row = logits[i].double().cpu()
        heat = float(temperature[i])
        if heat <= 0:
            tokens.append(int(torch.argmax(row)))  # the first maximum
            continue
        allowed = allowed_tokens(row, heat, int(top_k[i]), float(top_p[i]))
        probs = torch.softmax(row / heat, dim=0)
        race = probs / exponential_noise(int(seeds[i]), row.numel())
        tokens.append(max(allowed, key=lambda j: (float(race[j]), -j)))
    return tokens


def _rows(
    g: torch.Generator,
    batch: int,
    vocab: int,
    dtype: torch.dtype,
    *,
    temperature: tuple[float, ...] = (0.0, 0.5, 1.0, 1.7),
    top_k: tuple[int, ...] = (0, 1, 3, 7),
    top_p: tuple[float, ...] = (1.0, 0.3, 0.8, 0.0),
) -> tuple[torch.Tensor, ...]:
    logits = (torch.randn(batch, vocab, generator=g, dtype=torch.float64) * 2).to(dtype)

    def pick(values: tuple[float, ...] | tuple[int, ...], kind: torch.dtype) -> torch.Tensor:
        index = torch.randint(0, len(values), (batch,), generator=g)
        return torch.tensor(values, dtype=kind)[index]

    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=g, dtype=torch.int64)
    return tuple(
        t.to(DEVICE)
        for t in (
            logits,
            pick(temperature, torch.float32),
            pick(top_k, torch.int64),
            pick(top_p, torch.float32),
            seeds,
        )
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [1, 5, 40])
def test_sample_draws_what_the_definition_draws(dtype: torch.dtype, vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    args = _rows(g, 24, vocab, dtype)
    tokens = sample(*args)
    assert tokens.dtype == torch.int64 and tokens.shape == (24,)
    assert tokens.tolist() == reference_sample(*(a.cpu() for a in args))


@pytest.mark.parametrize("vocab", [272, 1000])
def test_a_batch_draws_each_row_as_the_row_alone_does(vocab: int) -> None:
    """Top-k rows of a small vocabulary with k near the vocabulary, between top-p rows: each
    row of the batch draws what it draws alone, and what the definition draws."""
    g = torch.Generator().manual_seed(vocab)
    batch = 16
    logits = (torch.randn(batch, vocab, generator=g) * 3).to(torch.float16)
    temperature = torch.rand(batch, generator=g) + 0.3
    top_k = torch.tensor([vocab - 5 if i % 2 == 0 else 0 for i in range(batch)])
    top_p = torch.tensor([1.0 if i % 2 == 0 else 0.9 for i in range(batch)])
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=g, dtype=torch.int64)
    args = tuple(t.to(DEVICE) for t in (logits, temperature, top_k, top_p, seeds))
    together = sample(*args).tolist()
    alone = [sample(*(a[i : i + 1] for a in args)).item() for i in range(batch)]
    assert together == alone == reference_sample(*(a.cpu() for a in args))


def test_sample_ties_go_to_the_lowest_index() -> None:
    # Equal logits everywhere: greedy takes token 0; top-k keeps the lowest indices.
    batch, vocab = 16, 12
    logits = torch.zeros(batch, vocab, device=DEVICE)
    temperature = torch.tensor([0.0] * 4 + [1.0] * 12, device=DEVICE)
    top_k = torch.tensor([0] * 4 + [3] * 6 + [5] * 6, device=DEVICE)
    top_p = torch.tensor([1.0] * 10 + [0.25] * 6, device=DEVICE)
    seeds = torch.arange(batch, dtype=torch.int64, device=DEVICE)
    tokens = sample(logits, temperature, top_k, top_p, seeds).tolist()
    assert tokens[:4] == [0, 0, 0, 0]
    assert all(t < 3 for t in tokens[4:10])
    # top-p 0.25 of five equal tokens: two (the first reaches 0.2, the second 0.4)
    assert all(t < 2 for t in tokens[10:])
    args = (logits, temperature, top_k, top_p, seeds)
    assert tokens == reference_sample(*(a.cpu() for a in args))


# Under the interpreter, numpy warns where float32 arithmetic reaches -inf or NaN, as it must.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_extreme_logits_and_temperatures_draw_what_the_definition_draws() -> None:
    """No overflow at tiny temperatures or near float32's limit, ``-inf`` masks a token, and a
    row without a finite logit still gives an id in range."""
    inf = math.inf
    rows = [
        ([100.0, 300.0, 200.0, 0.0], 1e-37),
        ([-3e38, 3e38, 0.0, 1.0], 0.5),
        ([3e38, 3e38, -3e38, 0.0], 1e-30),
        ([-inf, 2.0, -inf, 1.0], 1.0),
        ([-inf, -inf, 5.0, -inf], 1e-3),
    ]
    batch = 8 * len(rows)
    logits = torch.tensor([row for row, _ in rows] * 8)
    temperature = torch.tensor([t for _, t in rows] * 8)
    args = (
        logits,
        temperature,
        torch.zeros(batch, dtype=torch.int64),
        torch.ones(batch),
        torch.arange(batch, dtype=torch.int64) * 7919,
    )
    tokens = sample(*(a.to(DEVICE) for a in args)).tolist()
    assert tokens == reference_sample(*args)
    assert all(logits[i, t] > -inf for i, t in enumerate(tokens))
    odd = torch.tensor([[math.nan, 3.0, 2.0], [1.0, inf, 2.0], [-inf] * 3, [math.nan] * 3])
    for heat in (0.0, 1.0):
        drawn = sample(
            odd.to(DEVICE),
            torch.full((4,), heat, device=DEVICE),
            torch.zeros(4, dtype=torch.int64, device=DEVICE),
            torch.ones(4, device=DEVICE),
            torch.arange(4, dtype=torch.int64, device=DEVICE),
        )
        assert all(0 <= t < 3 for t in drawn.tolist()), drawn


def test_sample_is_a_fixed_function_of_the_seed() -> None:
    g = torch.Generator().manual_seed(3)
    logits, temperature, top_k, top_p, seeds = _rows(g, 32, 30, torch.float32)
    temperature.fill_(1.0)
    first = sample(logits, temperature, top_k, top_p, seeds)
    assert torch.equal(first, sample(logits, temperature, top_k, top_p, seeds))
    other = sample(logits, temperature, top_k, top_p, seeds + 1)
    assert not torch.equal(first, other)


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of the chi-square statistic (Wilson-Hilferty normal approximation)."""
    expected = probs * counts.sum()
    statistic = float(((counts - expected) ** 2 / expected).sum())
    df = counts.numel() - 1
    z = ((statistic / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize(
    ("top_k", "top_p", "draws"),
    [(0, 1.0, 3000), (5, 1.0, 1500), (0, 0.7, 1500), (6, 0.8, 1500)],
)
def test_draws_follow_the_distribution_over_the_allowed_tokens(
    top_k: int, top_p: float, draws: int
) -> None:
    draws = draws * 20 if ON_GPU else draws
    g = torch.Generator().manual_seed(top_k + int(top_p * 10))
    vocab, heat = 10, 0.9
    row = torch.randn(vocab, generator=g, dtype=torch.float64)
    logits = row.float().expand(draws, vocab).contiguous().to(DEVICE)
    seeds = torch.randint(-(2**62), 2**62, (draws,), generator=g, dtype=torch.int64).to(DEVICE)

    def full(value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((draws,), value, dtype=dtype, device=DEVICE)

    tokens = sample(
        logits,
        full(heat, torch.float32),
        full(top_k, torch.int64),
        full(top_p, torch.float32),
        seeds,
    ).cpu()
    allowed = allowed_tokens(row.float(), heat, top_k, top_p)
    assert set(tokens.tolist()) <= set(allowed), "a token outside top-k / top-p was drawn"
    probs = torch.softmax(row.float().double() / heat, dim=0)[allowed]
    counts = torch.bincount(tokens, minlength=vocab)[allowed].double()
    assert _chi_square_p_value(counts, probs / probs.sum()) > 1e-4


def test_sample_refuses_bad_arguments_before_launching() -> None:
    logits = torch.randn(3, 8, device=DEVICE)
    good = {
        "temperature": torch.ones(3, device=DEVICE),
        "top_k": torch.zeros(3, dtype=torch.int64, device=DEVICE),
        "top_p": torch.ones(3, device=DEVICE),
        "seeds": torch.zeros(3, dtype=torch.int64, device=DEVICE),
    }
    with pytest.raises(InvalidArgumentError, match=r"\[batch, vocab\]"):
        sample(logits[0], **good)
    with pytest.raises(InvalidArgumentError, match="top_k has shape"):
        sample(logits, **{**good, "top_k": good["top_k"][:2]})
    with pytest.raises(InvalidArgumentError, match="seeds is float32"):
        sample(logits, **{**good, "seeds": good["top_p"]})
    with pytest.raises(InvalidArgumentError, match="not contiguous"):
        sample(logits.t().contiguous().t(), **good)
    with pytest.raises(InvalidArgumentError, match="vocab size 0"):
        sample(logits[:, :0], **good)
    with pytest.raises(InvalidArgumentError, match="logits is int64"):
        sample(logits.long(), **good)
    assert sample(logits[:0], **{k: v[:0] for k, v in good.items()}).shape == (0,)


def test_sample_over_several_steps_of_a_row() -> None:
    """A vocabulary longer than one step of the per-row passes, with ties across steps."""
    g = torch.Generator().manual_seed(11)
    batch, vocab = 6, 4096 + 300
    logits = (torch.randn(batch, vocab, generator=g) * 2).to(torch.bfloat16).float()
    logits[:, 4100:4110] = logits[:, 10:20] = float(logits.max()) + 1  # ties in two steps
    temperature = torch.tensor([0.0, 1.0, 1.0, 0.7, 1.3, 1.0])
    top_k = torch.tensor([0, 15, 5, 0, 40, 12], dtype=torch.int64)
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.9, 0.8, 0.95])
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=g, dtype=torch.int64)
    args = (logits, temperature, top_k, top_p, seeds)
    tokens = sample(*(a.to(DEVICE) for a in args))
    assert tokens.tolist() == reference_sample(*args)


@pytest.mark.parametrize("candidates", [4, 64])
@pytest.mark.parametrize("vocab", [40, 4096 + 300])
def test_sample_past_the_gathered_keys(candidates: int, vocab: int) -> None:
    """Top-k rows whose k-th key's bucket holds more keys than are gathered: finer passes over
    the row, a gather at a finer byte, or the k-th key kept over the whole row (ties too)."""
    g = torch.Generator().manual_seed(vocab + candidates)
    batch = 12
    logits = (torch.randn(batch, vocab, generator=g) * 2).to(torch.bfloat16).float()
    logits[:4, 3:33] = float(logits.max()) + 1  # 30 tied at the top
    logits[4:8, 5:25] = 0.0  # ties at zero, signed both ways
    logits[4:8, 5:25:2] = -0.0
    logits[4:8, 25:] = -4.0
    logits[8:] = -logits[8:].abs() - 1  # all negative, as log-probabilities are
    temperature = torch.tensor([1.0, 0.8, 1.0, 1.3] * 3)
    top_k = torch.tensor([10, 31, 2, 29, 3, 20, 7, 1, 5, 50, 17, 3], dtype=torch.int64)
    top_p = torch.tensor([1.0, 0.6, 0.9, 1.0, 0.9, 1.0, 0.5, 0.7, 1.0, 0.8, 0.95, 0.3])
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=g, dtype=torch.int64)
    args = (logits, temperature, top_k, top_p, seeds)
    tokens = _sample(*(a.to(DEVICE) for a in args), candidates=candidates)
    assert tokens.tolist() == reference_sample(*args)
    assert torch.equal(tokens, sample(*(a.to(DEVICE) for a in args)))


@pytest.mark.parametrize("ties", [False, True], ids=["fp32", "bf16-ties"])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_gathered_rows_draw_what_whole_rows_draw(scale: float, ties: bool) -> None:
    """Top-k rows drawn from their gathered keys, at any number gathered, draw the tokens of the
    draw over the whole row (what a row gets when nothing can be gathered)."""
    batch, vocab = (64, 128256) if ON_GPU else (5, 4096 + 300)
    g = torch.Generator().manual_seed(int(scale * 10) + ties)
    logits = torch.randn(batch, vocab, generator=g) * scale
    if ties:
        logits = logits.to(torch.bfloat16).float()
    pick = torch.arange(batch)
    temperature = torch.tensor([0.7, 1.0, 1.5])[pick % 3]
    top_k = torch.tensor([1, 5, 50, 300, 1500])[pick % 5]
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.95, 0.2, 1.0])[pick % 7]
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=g, dtype=torch.int64)
    args = tuple(a.to(DEVICE) for a in (logits, temperature, top_k, top_p, seeds))
    whole = _sample(*args, candidates=1)
    for candidates in (64, 1024, 2048) if ON_GPU else (64, 2048):
        assert _sample(*args, candidates=candidates).tolist() == whole.tolist(), candidates


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sample_at_a_llama_3_vocabulary(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    args = _rows(
        g,
        16,
        128256,
        dtype,
        temperature=(0.0, 0.8, 1.0),
        top_k=(0, 50, 1000),
        top_p=(1.0, 0.9, 0.5),
    )
    assert sample(*args).tolist() == reference_sample(*(a.cpu() for a in args))
