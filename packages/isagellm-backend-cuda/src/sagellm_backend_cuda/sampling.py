# Triton kernels take untyped parameters (Triton reads their annotations itself) and triton.jit
# is untyped, so these two checks cannot apply to the kernel bodies in this module.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Device sampling without a sort: greedy, temperature, top-k and top-p, in two launches.

The draw is the standard op's (:class:`sagellm_backend.protocols.ops.Sample`): for row ``i``
with seed ``s`` and token ``j``, ``u_j`` is the splitmix64 finaliser of
``s * 0x9E3779B97F4A7C15 + j`` scaled into (0, 1), and the token drawn is the allowed one that
maximises ``p_j / -log(u_j)`` (an exponential race), lowest index on ties. The allowed tokens
are the ``top_k`` most likely, then the smallest prefix of those, most likely first, whose
probability reaches ``top_p`` of theirs. Likelihood order is the order of the logits (as fp32;
dividing by a positive temperature keeps it), ties by lower index.

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
_SCAN_BLOCK = 16384
"""Logits one step of a per-row pass over keys alone holds (the top-k histograms)."""
_RACE_BLOCK = 4096
"""Logits one step of a race pass holds (noise, weights and scores: more registers each)."""
_TILE = 4096
"""Logits a program holds at once when it takes several rows of a small vocabulary."""
_MAX_VOCAB = (1 << 31) - 1


@triton.jit
def _row_max_kernel(
    logits,
    logits_stride,
    chunk_max,
    chunk_index,
    batch,
    vocab,
    chunks,
    ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    chunk = tl.program_id(1)
    column = chunk * SPLIT + tl.arange(0, SPLIT)
    values = tl.load(
        logits + row[:, None] * logits_stride + column[None, :],
        mask=(row < batch)[:, None] & (column < vocab)[None, :],
        other=-float("inf"),
    ).to(tl.float32)
    best, at = tl.max(values, axis=1, return_indices=True, return_indices_tie_break_left=True)
    tl.store(chunk_max + row * chunks + chunk, best, mask=row < batch)
    tl.store(chunk_index + row * chunks + chunk, chunk * SPLIT + at, mask=row < batch)


@triton.jit
def _order_key(value):
    # An int32 whose signed order is the order of the fp32 ``value``.
    bits = value.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _logits(row_logits, column, live, VOCAB: tl.constexpr):
    # The fp32 logits of ``[rows, columns]`` (-inf past the row or where not live).
    raw = tl.load(
        row_logits[:, None] + column[None, :],
        mask=live[:, None] & (column < VOCAB)[None, :],
        other=-float("inf"),
    )
    return raw.to(tl.float32)


@triton.jit
def _exponential(base, column):
    # -log(u) of the shared noise: z is the splitmix64 finaliser of base + column (base = seed *
    # 0x9E3779B97F4A7C15) and u = ((z >> 11) + 0.5) * 2**-53. One log: of u below 1/2; above,
    # of 1 - t with t = 1 - u exact from the integer, corrected as Goldberg's log1p, so no
    # precision is lost near u = 1.
    z = base + column.to(tl.uint64)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    high = (z ^ (z >> 31)) >> 11
    low = high < 4503599627370496
    distance = tl.where(low, high, 9007199254740992 - high).to(tl.float32)
    t = (distance + tl.where(low, 0.5, -0.5)) * 1.1102230246251565e-16
    near_one = 1.0 - t
    log = tl.log(tl.where(low, t, near_one))
    below = tl.where(near_one < 1.0, near_one - 1.0, -1.0)
    return tl.where(low, -log, tl.where(near_one < 1.0, log * t / below, t))


@triton.jit
def _top_k_boundary(
    row_logits,
    k,
    live,
    VOCAB: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Per live row, (key, cut): its top k are the tokens whose key is above ``key``, and those
    # equal to it with an index below ``cut``. A radix select, most significant byte first; the
    # rows of a program share one histogram, row r's digits in bins [256 r, 256 r + 256).
    bins = tl.arange(0, 256)[None, :]
    lane = (tl.arange(0, ROWS) * 256)[:, None]
    prefix = tl.zeros([ROWS], tl.int32)
    above = tl.zeros([ROWS], tl.int32)
    chosen = tl.zeros([ROWS], tl.int32)
    counts = tl.zeros([ROWS, 256], tl.int32)
    for level in range(4):  # a loop, not unrolled: one copy of the histogram code
        shift = 24 - 8 * level
        flip = tl.where(level == 0, 128, 0)  # the top byte holds the sign: order it
        flat = tl.zeros([ROWS * 256], tl.int32)
        for start in range(0, VOCAB, BLOCK):
            column = start + tl.arange(0, BLOCK)
            key = _order_key(_logits(row_logits, column, live, VOCAB))
            digit = ((key >> shift) & 255) ^ flip
            # Keys whose higher bytes are the prefix chosen so far (all of them at level 0).
            inside = (
                live[:, None]
                & (column < VOCAB)[None, :]
                & ((level == 0) | (((key >> 8) >> shift) == prefix[:, None]))
            )
            flat += tl.histogram(
                tl.reshape(digit + lane, [ROWS * BLOCK]),
                ROWS * 256,
                mask=tl.reshape(inside, [ROWS * BLOCK]),
            )
        counts = tl.reshape(flat, [ROWS, 256])
        # The digit of the k-th key: the largest with at least k keys at or above it.
        at_or_above = tl.cumsum(counts, 1, reverse=True) + above[:, None]
        chosen = tl.max(tl.where(at_or_above >= k[:, None], bins, -1), 1)
        above += tl.sum(tl.where(bins > chosen[:, None], counts, 0), 1)
        prefix = tl.where(level == 0, chosen - 128, (prefix << 8) | chosen)
    needed = k - above
    tied = live & (needed < tl.sum(tl.where(bins == chosen[:, None], counts, 0), 1))
    cut = tl.full([ROWS], VOCAB, tl.int32)
    if tl.max(tied.to(tl.int32), 0) > 0:
        # The k-th key is tied: an ordered pass finds the index of the needed-th tie.
        seen = tl.zeros([ROWS], tl.int32)
        for start in range(0, VOCAB, BLOCK):
            column = start + tl.arange(0, BLOCK)
            key = _order_key(_logits(row_logits, column, tied, VOCAB))
            tie = (tied[:, None] & (column < VOCAB)[None, :] & (key == prefix[:, None])).to(
                tl.int32
            )
            rank = tl.cumsum(tie, 1) + seen[:, None]
            last = (tie > 0) & (rank == needed[:, None])
            cut = tl.minimum(cut, tl.min(tl.where(last, column[None, :] + 1, VOCAB), 1))
            seen += tl.sum(tie, 1)
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
    batch,
    chunks,
    VOCAB: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
    ROWS: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    RACE_BLOCK: tl.constexpr,
):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    live = row < batch
    chunk = tl.arange(0, CHUNKS_P2)[None, :]
    found = live[:, None] & (chunk < chunks)
    peaks = tl.load(chunk_max + row[:, None] * chunks + chunk, mask=found, other=-float("inf"))
    places = tl.load(chunk_index + row[:, None] * chunks + chunk, mask=found, other=VOCAB)
    peak = tl.max(peaks, 1)
    token = tl.min(tl.where(peaks == peak[:, None], places, VOCAB), 1)
    heat = tl.load(temperature + row, mask=live, other=0.0).to(tl.float32)
    sampling = live & (heat > 0)
    if tl.max(sampling.to(tl.int32), 0) > 0:
        # p_j is proportional to exp((l_j - peak) / heat) = 2 ** ((l_j - peak) * scale).
        scale = 1.4426950408889634 / tl.where(sampling, heat, 1.0)
        peak = tl.where(sampling, peak, 0.0)
        row_logits = logits + row * logits_stride
        k = tl.minimum(tl.maximum(tl.load(top_k + row, mask=sampling, other=0), 0), VOCAB)
        k = k.to(tl.int32)
        p = tl.load(top_p + row, mask=sampling, other=1.0).to(tl.float32)
        seed = tl.load(seeds + row, mask=sampling, other=0).to(tl.int64).to(tl.uint64, bitcast=True)
        base = seed * 0x9E3779B97F4A7C15
        keep = tl.where(p < 1.0, VOCAB, 0)  # scores are read again only with top-p
        # The top-k tokens: key above k_key, or equal to it below index k_cut.
        lowest = tl.full([ROWS], -2147483648, tl.int32)
        k_key = lowest
        k_cut = tl.full([ROWS], VOCAB, tl.int32)
        with_k = sampling & (k > 0) & (k < VOCAB)
        if tl.max(with_k.to(tl.int32), 0) > 0:
            k_key, k_cut = _top_k_boundary(row_logits, k, with_k, VOCAB, ROWS, SCAN_BLOCK)
            k_key = tl.where(with_k, k_key, lowest)
            k_cut = tl.where(with_k, k_cut, VOCAB)
        # The race; candidates are the top-k tokens ranked before the pivot (all, at first).
        pivot_key = lowest
        pivot = tl.full([ROWS], VOCAB, tl.int32)
        target = tl.zeros([ROWS], tl.float32)
        done = tl.where(sampling, 0, 1)
        rounds = 0
        while tl.min(done, 0) == 0:
            pending = done == 0
            best = tl.full([ROWS], -1.0, tl.float32)
            winner = tl.full([ROWS], VOCAB, tl.int32)
            mass = tl.zeros([ROWS], tl.float32)
            count = tl.zeros([ROWS], tl.int32)
            for start in range(0, VOCAB, RACE_BLOCK):
                column = start + tl.arange(0, RACE_BLOCK)
                value = _logits(row_logits, column, pending, VOCAB)
                key = _order_key(value)
                at = column[None, :]
                candidate = (
                    pending[:, None]
                    & (at < VOCAB)
                    & ((key > k_key[:, None]) | ((key == k_key[:, None]) & (at < k_cut[:, None])))
                    & (
                        (key > pivot_key[:, None])
                        | ((key == pivot_key[:, None]) & (at < pivot[:, None]))
                    )
                )
                weight = tl.where(candidate, tl.exp2((value - peak[:, None]) * scale[:, None]), 0.0)
                hits = tl.sum(candidate.to(tl.int32), 1)
                score = tl.full([ROWS, RACE_BLOCK], -1.0, tl.float32)
                if tl.max(hits, 0) > 0:
                    kept = scores + row[:, None] * VOCAB + at
                    if rounds == 0:
                        noise = _exponential(base[:, None], at)
                        score = tl.where(candidate, weight / noise, -1.0)
                        tl.store(kept, score, mask=candidate & (at < keep[:, None]))
                    else:
                        score = tl.load(kept, mask=candidate, other=-1.0)
                mass += tl.sum(weight, 1)
                count += hits
                step_best, where = tl.max(
                    score, 1, return_indices=True, return_indices_tie_break_left=True
                )
                better = step_best > best
                best = tl.where(better, step_best, best)
                winner = tl.where(better, start + where, winner)
            if rounds == 0:
                # Without top-p the winner is the draw (none only if every score is NaN).
                target = p * mass
                finish = pending & ((p >= 1.0) | (winner >= VOCAB))
                token = tl.where(finish & (winner < VOCAB), winner, token)
            else:
                # The pivot is the draw if less than top_p of the mass comes before it.
                finish = pending & ((mass < target) | (count == 0) | (winner >= VOCAB))
                token = tl.where(finish, pivot, token)
            done = tl.where(finish, 1, done)
            moving = pending & (finish == 0)
            pivot = tl.where(moving, winner, pivot)
            chosen = tl.load(row_logits + pivot, mask=moving, other=0.0).to(tl.float32)
            pivot_key = tl.where(moving, _order_key(chosen), pivot_key)
            rounds += 1
    tl.store(out + row, token.to(tl.int64), mask=live)


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
    restricted to the ``top_k[i]`` most likely tokens (0 or less, or ``vocab`` or more: all)
    and then to the smallest set of those whose probability reaches ``top_p[i]`` of theirs (1 or
    more: all; 0 or less: the most likely token). The draw is a fixed function of ``seeds[i]``.
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
    scan_block = min(_SCAN_BLOCK, triton.next_power_of_2(vocab))
    race_block = min(_RACE_BLOCK, scan_block)
    # Rows a program takes: one for a real vocabulary; several for small ones, fewer on the GPU,
    # whose histogram then has as many bins (Triton's interpreter, on CPU tensors, runs each
    # program's operations once for all its rows, so it takes many).
    most = 256 if device.type == "cpu" else 4
    rows = max(1, min(_TILE // scan_block, most, triton.next_power_of_2(batch)))
    chunk_max = torch.empty((batch, chunks), dtype=torch.float32, device=device)
    chunk_index = torch.empty((batch, chunks), dtype=torch.int32, device=device)
    scores = torch.empty((batch, vocab), dtype=torch.float32, device=device)
    split_rows = max(1, min(_SPLIT // split, most, triton.next_power_of_2(batch)))
    _row_max_kernel[(triton.cdiv(batch, split_rows), chunks)](
        logits,
        logits.stride(0),
        chunk_max,
        chunk_index,
        batch,
        vocab,
        chunks,
        ROWS=split_rows,
        SPLIT=split,
        num_warps=min(8, max(1, split_rows * split // 512)),
    )
    _sample_kernel[(triton.cdiv(batch, rows),)](
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
        batch,
        chunks,
        VOCAB=vocab,
        CHUNKS_P2=triton.next_power_of_2(chunks),
        ROWS=rows,
        SCAN_BLOCK=scan_block,
        RACE_BLOCK=race_block,
        num_warps=min(16, max(4, rows * race_block // 256)),
    )
    return out
