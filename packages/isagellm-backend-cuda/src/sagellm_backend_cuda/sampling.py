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
   chunk of logits and where it is, and for top-k rows the chunk's histogram of the top byte of
   an order-preserving integer key of the logit. Greedy rows need nothing more.
2. One program a sampling row, in passes over the row (which the first pass left in L2):

   - top-k: the chunk histograms summed give the byte of the k-th key (a radix select's first
     digit). While the keys at or above its bucket number more than ``_CANDIDATES``, a pass
     refines the bucket by the next byte (at most three). Then one pass gathers those keys and
     their indices, in index order, into a scratch row, and the rest is done in registers with
     reductions alone: the k-th key a bit at a time, the index where its ties stop if they run
     past k, then the race below over the top k. A row with more keys than that at or above
     its k-th key (a larger k, or as many ties) keeps its top k over the whole row instead (one
     ordered pass for where the ties stop).
   - the race among the allowed tokens. Without top-p its winner is the draw. With top-p, the
     winner is drawn from a superset of the allowed tokens, so it is the draw exactly when the
     probability of the tokens before it is below ``top_p``; else the race is run again among
     the tokens before it. Each round strictly shrinks the candidates, and a winner is drawn in
     proportion to its probability, so it ends after a few rounds (about log2 of the candidates
     when they are equally likely). Over gathered keys a round is a few reductions; over a whole
     row (top-p alone) a pass, which sums the probability before the last winner and runs the
     next race at once, from scores kept by the first pass.

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
"""Logits one program of the split pass reads."""
_HIST_BLOCK = 512
"""Logits the split pass's histogram takes at once (read again from L1, few registers)."""
_SCAN_BLOCK = 16384
"""Logits one step of a per-row histogram pass holds."""
_GATHER_BLOCK = 8192
"""Logits one step of the gathering pass holds (its prefix sum needs more registers)."""
_RACE_BLOCK = 4096
"""Logits one step of a race pass holds (noise, weights and scores: more registers each)."""
_TILE = 4096
"""Logits a program holds at once when it takes several rows of a small vocabulary."""
_CANDIDATES = 2048
"""Keys a top-k row gathers into registers at most (those at or above the k-th key's bucket)."""
_CHUNK_TILE = 32
"""Chunk histograms summed at once."""
_MAX_VOCAB = (1 << 31) - 1


@triton.jit
def _order_key(value):
    # An int32 whose signed order is the order of the fp32 ``value`` (-0 and +0 are equal).
    bits = (value + 0.0).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _digit(key, level):
    # Byte ``level`` of the key, most significant first; the top byte holds the sign: order it.
    return ((key >> (24 - 8 * level)) & 255) ^ tl.where(level == 0, 128, 0)


@triton.jit
def _in_bucket(key, prefix, level):
    # Keys whose bytes above ``level`` are the row's ``prefix`` (every key at level 0).
    return (level == 0) | (((key >> 8) >> (24 - 8 * level)) == prefix[:, None])


@triton.jit
def _digit_counts(digit, inside, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    # ``[rows, 256]``: how many of the ``inside`` bytes ``digit`` have each value; the rows
    # share one histogram, row r's in bins [256 r, 256 r + 256).
    lane = (tl.arange(0, ROWS) * 256)[:, None]
    flat = tl.histogram(
        tl.reshape(digit + lane, [ROWS * WIDTH]),
        ROWS * 256,
        mask=tl.reshape(inside, [ROWS * WIDTH]),
    )
    return tl.reshape(flat, [ROWS, 256])


@triton.jit
def _choose(counts, k, above):
    # The byte of the k-th key: the largest with at least k keys at or above it, given ``above``
    # keys above the bucket counted. Returns it, the keys above it and the keys in it.
    bins = tl.arange(0, 256)[None, :]
    at_or_above = tl.cumsum(counts, 1, reverse=True) + above[:, None]
    chosen = tl.max(tl.where(at_or_above >= k[:, None], bins, -1), 1)
    # Read off the sums only (a histogram's result used once compiles once).
    upto = tl.max(tl.where(bins == chosen[:, None], at_or_above, 0), 1)
    higher = tl.max(tl.where(bins == chosen[:, None] + 1, at_or_above, above[:, None]), 1)
    return chosen, higher, upto - higher


@triton.jit
def _row_max_kernel(
    logits,
    logits_stride,
    temperature,
    top_k,
    chunk_max,
    chunk_index,
    chunk_counts,
    batch,
    vocab,
    chunks,
    ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
    HIST_BLOCK: tl.constexpr,
):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    chunk = tl.program_id(1)
    live = row < batch
    heat = tl.load(temperature + row, mask=live, other=0.0)  # first: its wait overlaps
    k = tl.load(top_k + row, mask=live, other=0)
    column = chunk * SPLIT + tl.arange(0, SPLIT)
    values = tl.load(
        logits + row[:, None] * logits_stride + column[None, :],
        mask=live[:, None] & (column < vocab)[None, :],
        other=-float("inf"),
    ).to(tl.float32)
    best, at = tl.max(values, axis=1, return_indices=True, return_indices_tie_break_left=True)
    tl.store(chunk_max + row * chunks + chunk, best, mask=live)
    tl.store(chunk_index + row * chunks + chunk, chunk * SPLIT + at, mask=live)
    # Top-k rows: the chunk's histogram of the keys' top byte (read again, a block at a time).
    counting = live & (heat > 0) & (k > 0) & (k < vocab)
    if tl.max(counting.to(tl.int32), 0) > 0:
        counts = tl.zeros([ROWS, 256], tl.int32)
        for start in range(0, SPLIT, HIST_BLOCK):
            part = chunk * SPLIT + start + tl.arange(0, HIST_BLOCK)
            inside = counting[:, None] & (part < vocab)[None, :]
            value = tl.load(logits + row[:, None] * logits_stride + part[None, :], mask=inside)
            digit = ((_order_key(value.to(tl.float32)) >> 24) & 255) ^ 128
            counts += _digit_counts(digit, inside, ROWS, HIST_BLOCK)
        bins = tl.arange(0, 256)[None, :]
        tl.store(
            chunk_counts + (row * chunks + chunk)[:, None] * 256 + bins,
            counts,
            mask=counting[:, None],
        )


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
def _level_zero(
    chunk_counts, row, live, CHUNKS: tl.constexpr, ROWS: tl.constexpr, CHUNK_TILE: tl.constexpr
):
    # ``[rows, 256]``: the split pass's top-byte histograms of a row's chunks, summed.
    bins = tl.arange(0, 256)[None, None, :]
    counts = tl.zeros([ROWS, 256], tl.int32)
    for first in range(0, CHUNKS, CHUNK_TILE):
        chunk = first + tl.arange(0, CHUNK_TILE)[None, :, None]
        tile = tl.load(
            chunk_counts + (row[:, None, None] * CHUNKS + chunk) * 256 + bins,
            mask=live[:, None, None] & (chunk < CHUNKS),
            other=0,
        )
        counts += tl.sum(tile, 1)
    return counts


@triton.jit
def _refine(
    row_logits,
    k,
    live,
    prefix,
    above,
    inner,
    VOCAB: tl.constexpr,
    ROWS: tl.constexpr,
    CANDIDATES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # From the k-th key's top byte (``prefix``, with ``above`` keys above its bucket and
    # ``inner`` in it), a pass per further byte while the bucket and above hold more than
    # CANDIDATES keys. Returns the prefix, the counts and the least key at or above the bucket.
    low = prefix << 24
    for level in range(1, 4):  # a loop, not unrolled: one copy of the histogram code
        wide = live & (above + inner > CANDIDATES)
        if tl.max(wide.to(tl.int32), 0) > 0:
            counts = tl.zeros([ROWS, 256], tl.int32)
            for start in range(0, VOCAB, BLOCK):
                column = start + tl.arange(0, BLOCK)
                key = _order_key(_logits(row_logits, column, wide, VOCAB))
                inside = wide[:, None] & (column < VOCAB)[None, :] & _in_bucket(key, prefix, level)
                counts += _digit_counts(_digit(key, level), inside, ROWS, BLOCK)
            chosen, higher, within = _choose(counts, k, above)
            above = tl.where(wide, higher, above)
            inner = tl.where(wide, within, inner)
            prefix = tl.where(wide, (prefix << 8) | chosen, prefix)
            low = tl.where(wide, prefix << (24 - 8 * level), low)
    return prefix, above, inner, low


@triton.jit
def _tie_cut(
    row_logits,
    tied,
    key_value,
    needed,
    VOCAB: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One ordered pass: the index just past the needed-th key equal to ``key_value``.
    cut = tl.full([ROWS], VOCAB, tl.int32)
    seen = tl.zeros([ROWS], tl.int32)
    for start in range(0, VOCAB, BLOCK):
        column = start + tl.arange(0, BLOCK)
        key = _order_key(_logits(row_logits, column, tied, VOCAB))
        tie = (tied[:, None] & (column < VOCAB)[None, :] & (key == key_value[:, None])).to(tl.int32)
        rank = tl.cumsum(tie, 1) + seen[:, None]
        last = (tie > 0) & (rank == needed[:, None])
        cut = tl.minimum(cut, tl.min(tl.where(last, column[None, :] + 1, VOCAB), 1))
        seen += tl.sum(tie, 1)
    return cut


@triton.jit
def _gather(
    row_logits,
    low,
    live,
    kept_value,
    kept_index,
    VOCAB: tl.constexpr,
    CANDIDATES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Writes each live row's logits whose key is at least ``low``, and their indices, to the
    # row's scratch, in index order; returns how many.
    count = tl.zeros(low.shape, tl.int32)
    column = tl.arange(0, BLOCK)
    value = _logits(row_logits, column, live, VOCAB)
    for _ in range(0, VOCAB, BLOCK):
        ahead = _logits(row_logits, column + BLOCK, live, VOCAB)  # the next step's, in flight
        hit = live[:, None] & (column < VOCAB)[None, :] & (_order_key(value) >= low[:, None])
        hits = hit.to(tl.int32)
        step = tl.sum(hits, 1)
        if tl.max(step, 0) > 0:
            slot = count[:, None] + tl.cumsum(hits, 1) - 1
            hit = hit & (slot < CANDIDATES)  # always, as the counts said: kept in bounds
            tl.store(kept_value[:, None] + slot, value, mask=hit)
            tl.store(kept_index[:, None] + slot, column[None, :] + hits * 0, mask=hit)
        value = ahead
        column += BLOCK
        count += step
    return count


@triton.jit
def _draw_gathered(
    kept_value,
    kept_index,
    count,
    low,
    k,
    p,
    peak,
    scale,
    base,
    token,
    live,
    VOCAB: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    ROWS: tl.constexpr,
    CANDIDATES: tl.constexpr,
):
    # The draw of each live row from its gathered logits (a superset of its top k: those whose
    # key is at least ``low``, which has no bit set below the top byte), in registers, with
    # reductions only; other rows keep ``token``.
    slot = tl.arange(0, CANDIDATES)[None, :]
    valid = live[:, None] & (slot < count[:, None])
    value = tl.load(kept_value[:, None] + slot, mask=valid, other=0.0)
    index = tl.load(kept_index[:, None] + slot, mask=valid, other=VOCAB)
    key = _order_key(value)
    # The k-th key (the row's): the largest with k keys at or above it, a bit at a time.
    kth = low
    for bit in range(24):
        trial = kth | (1 << (23 - bit))
        at_or_above = tl.sum((valid & (key >= trial[:, None])).to(tl.int32), 1)
        kth = tl.where(at_or_above >= k, trial, kth)
    above = tl.sum((valid & (key > kth[:, None])).to(tl.int32), 1)
    tie = valid & (key == kth[:, None])
    needed = k - above
    cut = tl.full([ROWS], VOCAB, tl.int32)
    narrow = live & (tl.sum(tie.to(tl.int32), 1) > needed)
    if tl.max(narrow.to(tl.int32), 0) > 0:
        # The k-th key is tied past k: the index of its needed-th tie, the largest index with
        # fewer than needed ties below it, a bit at a time.
        last = tl.zeros([ROWS], tl.int32)
        for bit in range(INDEX_BITS):
            trial = last | (1 << (INDEX_BITS - 1 - bit))
            below = tl.sum((tie & (index < trial[:, None])).to(tl.int32), 1)
            last = tl.where(below < needed, trial, last)
        cut = tl.where(narrow, last + 1, cut)
    kept = valid & ((key > kth[:, None]) | (tie & (index < cut[:, None])))
    # The race among the top k, then among the tokens before the winner while top-p refuses it.
    weight = tl.where(kept, tl.exp2((value - peak[:, None]) * scale[:, None]), 0.0)
    target = p * tl.sum(weight, 1)
    score = tl.where(kept, weight / _exponential(base[:, None], index), -1.0)
    candidate = kept
    pending = live
    while tl.max(pending.to(tl.int32), 0) > 0:
        best = tl.max(tl.where(candidate, score, -1.0), 1)
        winner = tl.min(tl.where(candidate & (score == best[:, None]), index, VOCAB), 1)
        winner_key = tl.max(tl.where(candidate & (index == winner[:, None]), key, -2147483648), 1)
        before = kept & (
            (key > winner_key[:, None]) | ((key == winner_key[:, None]) & (index < winner[:, None]))
        )
        mass = tl.sum(tl.where(before, weight, 0.0), 1)
        ahead = tl.sum(before.to(tl.int32), 1)
        # The winner is the draw if less than top_p of the mass comes before it (none only if
        # every score is NaN).
        found = best > -1.0
        allowed = found & ((p >= 1.0) | (mass < target) | (ahead == 0))
        token = tl.where(pending & allowed, winner, token)
        pending = pending & found & (allowed == 0)
        candidate = candidate & before
    return token


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
    chunk_counts,
    kept_value,
    kept_index,
    scores,
    out,
    batch,
    VOCAB: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    CHUNKS: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
    ROWS: tl.constexpr,
    CANDIDATES: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    GATHER_BLOCK: tl.constexpr,
    RACE_BLOCK: tl.constexpr,
):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    live = row < batch
    heat = tl.load(temperature + row, mask=live, other=0.0).to(tl.float32)
    chunk = tl.arange(0, CHUNKS_P2)[None, :]
    found = live[:, None] & (chunk < CHUNKS)
    peaks = tl.load(chunk_max + row[:, None] * CHUNKS + chunk, mask=found, other=-float("inf"))
    places = tl.load(chunk_index + row[:, None] * CHUNKS + chunk, mask=found, other=VOCAB)
    peak = tl.max(peaks, 1)
    token = tl.min(tl.where(peaks == peak[:, None], places, VOCAB), 1)
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
        # Top-k rows drawn in registers, or else their top k over the whole row: the tokens
        # whose key is above k_key, or equal to it below index k_cut.
        lowest = tl.full([ROWS], -2147483648, tl.int32)
        k_key = lowest
        k_cut = tl.full([ROWS], VOCAB, tl.int32)
        with_k = sampling & (k > 0) & (k < VOCAB)
        gathered = with_k & (k < 0)
        if tl.max(with_k.to(tl.int32), 0) > 0:
            counts = _level_zero(chunk_counts, row, with_k, CHUNKS, ROWS, CHUNK_TILE)
            chosen, above, inner = _choose(counts, k, tl.zeros([ROWS], tl.int32))
            prefix = chosen - 128
            prefix, above, inner, low = _refine(
                row_logits, k, with_k, prefix, above, inner, VOCAB, ROWS, CANDIDATES, SCAN_BLOCK
            )
            gathered = with_k & (above + inner <= CANDIDATES)
            if tl.max(gathered.to(tl.int32), 0) > 0:
                kept_value_row = kept_value + row * CANDIDATES
                kept_index_row = kept_index + row * CANDIDATES
                gathered_count = _gather(
                    row_logits,
                    low,
                    gathered,
                    kept_value_row,
                    kept_index_row,
                    VOCAB,
                    CANDIDATES,
                    GATHER_BLOCK,
                )
                tl.debug_barrier()  # the scratch written by every thread, read by others
                token = _draw_gathered(
                    kept_value_row,
                    kept_index_row,
                    gathered_count,
                    low,
                    k,
                    p,
                    peak,
                    scale,
                    base,
                    token,
                    gathered,
                    VOCAB,
                    INDEX_BITS,
                    ROWS,
                    CANDIDATES,
                )
            # The rest: prefix is the k-th key; past it, only ties up to k.
            tied = with_k & (gathered == 0)
            needed = k - above
            tied = tied & (needed < inner)
            cut = tl.full([ROWS], VOCAB, tl.int32)
            if tl.max(tied.to(tl.int32), 0) > 0:
                cut = _tie_cut(row_logits, tied, prefix, needed, VOCAB, ROWS, SCAN_BLOCK)
            whole = with_k & (gathered == 0)
            k_key = tl.where(whole, prefix, lowest)
            k_cut = tl.where(whole, cut, VOCAB)
        # The race over whole rows; candidates are the top-k tokens ranked before the pivot
        # (all, at first).
        pivot_key = lowest
        pivot = tl.full([ROWS], VOCAB, tl.int32)
        target = tl.zeros([ROWS], tl.float32)
        done = tl.where(sampling & (gathered == 0), 0, 1)
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
            pivot_value = tl.load(row_logits + pivot, mask=moving, other=0.0).to(tl.float32)
            pivot_key = tl.where(moving, _order_key(pivot_value), pivot_key)
            rounds += 1
    token = tl.where(token < VOCAB, token, 0)  # no maximum and no winner: a NaN row
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
    A logit of ``-inf`` masks its token; a row with no finite logit, or with a NaN or ``+inf``,
    draws some token id of the row's range, which one is not specified.
    """
    return _sample(logits, temperature, top_k, top_p, seeds)


def _sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    *,
    candidates: int = _CANDIDATES,
    hist_block: int = _HIST_BLOCK,
    scan_block: int = _SCAN_BLOCK,
    gather_block: int = _GATHER_BLOCK,
    race_block: int = _RACE_BLOCK,
    warps: int = 16,
) -> torch.Tensor:
    """:func:`sample`, with the kernels' shapes: the keys a row gathers at most (a power of 2),
    the split pass's histogram step, the per-row passes' steps and warps at most."""
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
    scan_block = min(scan_block, triton.next_power_of_2(vocab))
    race_block = min(race_block, scan_block)
    kept = min(candidates, triton.next_power_of_2(vocab))
    # Rows a program takes: one on the GPU (a real vocabulary needs a program per row anyway;
    # with several rows of a small vocabulary per program, the H200 drew a wrong token for a
    # top-k row that a program of its own draws right). Triton's interpreter, on CPU tensors,
    # runs each program's operations once for all its rows, so there it takes many.
    most = 256 if device.type == "cpu" else 1
    rows = max(1, min(_TILE // scan_block, most, triton.next_power_of_2(batch)))
    chunk_max = torch.empty((batch, chunks), dtype=torch.float32, device=device)
    chunk_index = torch.empty((batch, chunks), dtype=torch.int32, device=device)
    chunk_counts = torch.empty((batch, chunks, 256), dtype=torch.int32, device=device)
    kept_value = torch.empty((batch, kept), dtype=torch.float32, device=device)
    kept_index = torch.empty((batch, kept), dtype=torch.int32, device=device)
    scores = torch.empty((batch, vocab), dtype=torch.float32, device=device)
    split_rows = max(1, min(_SPLIT // split, most, triton.next_power_of_2(batch)))
    _row_max_kernel[(triton.cdiv(batch, split_rows), chunks)](
        logits,
        logits.stride(0),
        temperature,
        top_k,
        chunk_max,
        chunk_index,
        chunk_counts,
        batch,
        vocab,
        chunks,
        ROWS=split_rows,
        SPLIT=split,
        HIST_BLOCK=min(hist_block, split),
        num_warps=min(8, max(1, split_rows * split // 512)),
    )
    chunks_p2 = triton.next_power_of_2(chunks)
    _sample_kernel[(triton.cdiv(batch, rows),)](
        logits,
        logits.stride(0),
        temperature,
        top_k,
        top_p,
        seeds,
        chunk_max,
        chunk_index,
        chunk_counts,
        kept_value,
        kept_index,
        scores,
        out,
        batch,
        VOCAB=vocab,
        INDEX_BITS=max(1, (vocab - 1).bit_length()),
        CHUNKS=chunks,
        CHUNKS_P2=chunks_p2,
        CHUNK_TILE=min(_CHUNK_TILE, chunks_p2),
        ROWS=rows,
        CANDIDATES=kept,
        SCAN_BLOCK=scan_block,
        GATHER_BLOCK=min(gather_block, scan_block),
        RACE_BLOCK=race_block,
        num_warps=min(warps, max(4, rows * race_block // 256)),
    )
    return out
