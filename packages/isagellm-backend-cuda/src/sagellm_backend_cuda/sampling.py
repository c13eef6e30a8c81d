# Triton kernels take untyped parameters (Triton reads their annotations itself) and triton.jit
# is untyped, so these two checks cannot apply to the kernel bodies in this module.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Device sampling without a sort: greedy, temperature, top-k and top-p, in two launches.

The draw is the standard op's (:class:`sagellm_backend.protocols.ops.Sample`): for row ``i``
with seed ``s`` and token ``j``, ``u_j`` is the splitmix64 finaliser of
``s * 0x9E3779B97F4A7C15 + j`` scaled into (0, 1), and the token drawn is the allowed one that
maximises ``p_j / -log(u_j)`` (an exponential race), lowest index on ties. The allowed tokens
are the ``top_k`` most likely, then the smallest prefix of those, most likely first, whose
probability reaches ``top_p`` of theirs. Likelihood order is the order of the fp32 values
``logits / temperature``, ties by lower index.

1. A split pass over every row (many programs a row, so it fills the GPU): the maximum of each
   chunk of logits and where it is. Greedy rows need nothing more.
2. One program a sampling row, in passes over the row (which the first pass left in L2):

   - top-k: a radix select of the k-th largest value over the bits of its order-preserving
     integer key, 8 bits a pass (four histogram passes), then, only if the k-th value is tied,
     one ordered pass for the index where the ties stop;
   - the race among the top-k tokens, with the noise computed only in chunks that hold one;
     without top-p its winner is the draw. With top-p, the winner is drawn from a superset of
     the allowed tokens, so it is the draw exactly when it is allowed, i.e. when the
     probability of the tokens before it is below ``top_p``: the next pass sums that and, in
     the same pass, runs the race again among the tokens before it (scores kept from the first
     pass). Each round strictly shrinks the candidates, and a winner is drawn in proportion to
     its probability, so it ends after a few rounds (about log2 of the candidates when they are
     equally likely) and never reads a sorted copy of the row.

Every row's work is deterministic (a fixed order of reductions), so equal seeds and logits give
equal tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend_cuda.arguments import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    require_dtype,
    require_same_device,
    require_shape,
)

__all__ = ["sample"]

_SPLIT = 4096
"""Logits one program of the split max pass reads."""
_BLOCK = 4096
"""Logits one step of a per-row pass holds."""
_MAX_VOCAB = (1 << 31) - 1


@triton.jit
def _row_max_kernel(
    logits, logits_stride, chunk_max, chunk_index, vocab, chunks, SPLIT: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    column = chunk * SPLIT + tl.arange(0, SPLIT)
    values = tl.load(
        logits + row * logits_stride + column, mask=column < vocab, other=-float("inf")
    ).to(tl.float32)
    best, at = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(chunk_max + row * chunks + chunk, best)
    tl.store(chunk_index + row * chunks + chunk, chunk * SPLIT + at)


@triton.jit
def _order_key(value):
    # An int32 whose signed order is the order of the fp32 ``value``.
    bits = value.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _scaled(row_logits, column, vocab, temperature):
    # The fp32 logits / temperature of ``column`` (-inf past the row).
    raw = tl.load(row_logits + column, mask=column < vocab, other=-float("inf"))
    return raw.to(tl.float32) / temperature


@triton.jit
def _exponential(seed, column):
    # -log(u) of the shared noise: u = ((z >> 11) + 0.5) * 2**-53, z the splitmix64 finaliser of
    # seed * 0x9E3779B97F4A7C15 + column. Below 1/2, log(u) directly; above, log1p(-(1 - u)) with
    # 1 - u taken exactly from the integer (Goldberg's log1p), so no precision is lost near 1.
    z = seed * 0x9E3779B97F4A7C15 + column.to(tl.uint64)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    high = (z ^ (z >> 31)) >> 11
    low = (high.to(tl.float32) + 0.5) * 1.1102230246251565e-16
    rest = ((9007199254740992 - high).to(tl.float32) - 0.5) * 1.1102230246251565e-16
    near_one = tl.maximum(1.0 - rest, 0.5)  # the other branch below 1/2
    log1p = tl.where(near_one == 1.0, -rest, tl.log(near_one) * -rest / (near_one - 1.0))
    return tl.where(high < 4503599627370496, -tl.log(low), -log1p)


@triton.jit
def _top_k_boundary(row_logits, VOCAB: tl.constexpr, temperature, k, BLOCK: tl.constexpr):
    # (key, cut): the top k are the tokens whose key is above ``key``, and those equal to it
    # with an index below ``cut``. A radix select, most significant byte first.
    bins = tl.arange(0, 256)
    prefix = k * 0
    above = k * 0
    hist = tl.zeros([256], tl.int32)
    chosen = k * 0
    for level in tl.static_range(4):
        hist = tl.zeros([256], tl.int32)
        for start in range(0, VOCAB, BLOCK):
            column = start + tl.arange(0, BLOCK)
            key = _order_key(_scaled(row_logits, column, VOCAB, temperature))
            if level == 0:
                live = column < VOCAB
                digit = (key >> 24) + 128
            else:
                live = (column < VOCAB) & ((key >> (32 - 8 * level)) == prefix)
                digit = (key >> (24 - 8 * level)) & 255
            hist += tl.histogram(digit, 256, mask=live)
        # The digit of the k-th key: the largest with at least k keys at or above it.
        chosen = k * 0
        for bit in tl.static_range(7, -1, -1):
            trial = chosen | (1 << bit)
            if above + tl.sum(tl.where(bins >= trial, hist, 0), 0) >= k:
                chosen = trial
        above += tl.sum(tl.where(bins > chosen, hist, 0), 0)
        prefix = chosen - 128 if level == 0 else (prefix << 8) | chosen
    needed = k - above
    cut = k * 0 + VOCAB
    if needed < tl.sum(tl.where(bins == chosen, hist, 0), 0):
        seen = k * 0
        for start in range(0, VOCAB, BLOCK):
            column = start + tl.arange(0, BLOCK)
            key = _order_key(_scaled(row_logits, column, VOCAB, temperature))
            tie = ((column < VOCAB) & (key == prefix)).to(tl.int32)
            rank = tl.cumsum(tie, 0) + seen
            cut = tl.minimum(
                cut, tl.min(tl.where((tie > 0) & (rank == needed), column + 1, VOCAB), 0)
            )
            seen += tl.sum(tie, 0)
    return prefix, cut


@triton.jit
def _sample_kernel(
    logits,
    logits_stride,
    temperature,
    top_k,
    top_p,
    seeds,
    chunk_max,
    chunk_index,
    scores,
    out,
    chunks,
    VOCAB: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.arange(0, CHUNKS_P2)
    peaks = tl.load(chunk_max + row * chunks + chunk, mask=chunk < chunks, other=-float("inf"))
    places = tl.load(chunk_index + row * chunks + chunk, mask=chunk < chunks, other=VOCAB)
    peak = tl.max(peaks, 0)
    token = tl.min(tl.where(peaks == peak, places, VOCAB), 0)
    heat = tl.load(temperature + row).to(tl.float32)
    if heat > 0:
        row_logits = logits + row * logits_stride
        row_scores = scores + row * VOCAB
        k = tl.minimum(tl.maximum(tl.load(top_k + row), 0), VOCAB).to(tl.int32)
        p = tl.load(top_p + row).to(tl.float32)
        seed = tl.load(seeds + row).to(tl.int64).to(tl.uint64, bitcast=True)
        top = peak / heat
        keep = tl.where(p < 1.0, VOCAB, 0)  # scores are read again only with top-p
        # The top-k tokens: key above k_key, or equal to it below index k_cut.
        k_key = token * 0 - 2147483647 - 1
        k_cut = token * 0 + VOCAB
        if (k > 0) & (k < VOCAB):
            k_key, k_cut = _top_k_boundary(row_logits, VOCAB, heat, k, BLOCK)
        # The race; candidates are the top-k tokens ranked before the pivot (all, at first).
        pivot_key = token * 0 - 2147483647 - 1
        pivot = token * 0 + VOCAB
        target = peak * 0.0
        rounds = token * 0
        done = token * 0
        while done == 0:
            best = peak * 0.0 - 1.0
            winner = token * 0 + VOCAB
            mass = peak * 0.0
            count = token * 0
            for start in range(0, VOCAB, BLOCK):
                column = start + tl.arange(0, BLOCK)
                scaled = _scaled(row_logits, column, VOCAB, heat)
                key = _order_key(scaled)
                candidate = (
                    (column < VOCAB)
                    & ((key > k_key) | ((key == k_key) & (column < k_cut)))
                    & ((key > pivot_key) | ((key == pivot_key) & (column < pivot)))
                )
                weight = tl.where(candidate, tl.exp(scaled - top), 0.0)
                found = tl.sum(candidate.to(tl.int32), 0)
                score = tl.full([BLOCK], -1.0, tl.float32)
                if found > 0:
                    if rounds == 0:
                        score = tl.where(candidate, weight / _exponential(seed, column), -1.0)
                        tl.store(row_scores + column, score, mask=candidate & (column < keep))
                    else:
                        score = tl.load(row_scores + column, mask=candidate, other=-1.0)
                mass += tl.sum(weight, 0)
                count += found
                step_best, at = tl.max(
                    score, 0, return_indices=True, return_indices_tie_break_left=True
                )
                if step_best > best:
                    best = step_best
                    winner = start + at
            if rounds == 0:
                # Without top-p the winner is the draw (none only if every score is NaN).
                target = p * mass
                if (p >= 1.0) | (winner >= VOCAB):
                    done = 1
                    token = tl.where(winner < VOCAB, winner, token)
            elif (mass < target) | (count == 0) | (winner >= VOCAB):
                # The pivot is allowed: less than top_p of the mass comes before it.
                done = 1
                token = pivot
            if done == 0:
                pivot = winner
                pivot_key = _order_key(_scaled(row_logits, winner, VOCAB, heat))
            rounds += 1
    tl.store(out + row, token.to(tl.int64))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """One token id per row of ``logits[b, vocab]``, int64 ``[b]``.

    ``temperature[b]`` and ``top_p[b]`` float, ``top_k[b]`` int32 or int64, ``seeds[b]`` int64
    (or int32), all on the logits' device. Row ``i`` is greedy (argmax, lowest index on ties)
    where ``temperature[i] <= 0``; else it draws from ``softmax(logits[i] / temperature[i])``
    restricted to the ``top_k[i]`` most likely tokens (0 or at least ``vocab``: all) and then to
    the smallest set of those whose probability reaches ``top_p[i]`` of theirs (1 or more: all;
    0 or less: the most likely token). The draw is a fixed function of ``seeds[i]``.
    """
    op = "sample"
    require_dtype(op, "logits", logits, FLOAT_DTYPES)
    if logits.dim() != 2:
        raise InvalidArgumentError(
            f"{op}: logits has shape {list(logits.shape)}, expected [batch, vocab]",
            hint="pass one row of logits per sequence",
        )
    batch, vocab = logits.shape
    if not 0 < vocab <= _MAX_VOCAB:
        raise InvalidArgumentError(
            f"{op}: vocab size {vocab} is outside 1..{_MAX_VOCAB}",
            hint="pass logits over a non-empty vocabulary",
        )
    if vocab > 1 and logits.stride(1) != 1:
        raise InvalidArgumentError(
            f"{op}: logits' vocab dimension is not contiguous", hint="pass logits.contiguous()"
        )
    for name, tensor, dtypes in (
        ("temperature", temperature, FLOAT_DTYPES),
        ("top_k", top_k, INDEX_DTYPES),
        ("top_p", top_p, FLOAT_DTYPES),
        ("seeds", seeds, INDEX_DTYPES),
    ):
        require_dtype(op, name, tensor, dtypes)
        require_shape(op, name, tensor, (batch,))
    require_same_device(
        op, logits=logits, temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds
    )
    device = logits.device
    out = torch.empty(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return out
    split = min(_SPLIT, triton.next_power_of_2(vocab))
    chunks = triton.cdiv(vocab, split)
    chunk_max = torch.empty((batch, chunks), dtype=torch.float32, device=device)
    chunk_index = torch.empty((batch, chunks), dtype=torch.int32, device=device)
    scores = torch.empty((batch, vocab), dtype=torch.float32, device=device)
    _row_max_kernel[(batch, chunks)](
        logits,
        logits.stride(0),
        chunk_max,
        chunk_index,
        vocab,
        chunks,
        SPLIT=split,
        num_warps=min(8, max(1, split // 512)),
    )
    block = min(_BLOCK, triton.next_power_of_2(vocab))
    _sample_kernel[(batch,)](
        logits,
        logits.stride(0),
        temperature,
        top_k,
        top_p,
        seeds,
        chunk_max,
        chunk_index,
        scores,
        out,
        chunks,
        VOCAB=vocab,
        CHUNKS_P2=triton.next_power_of_2(chunks),
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out
