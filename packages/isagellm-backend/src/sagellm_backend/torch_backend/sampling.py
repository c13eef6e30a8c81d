"""sample: one token per row of logits, greedy or top-k / top-p filtered, drawn from the seeds.

The draw is a fixed function of the row's seed, shared with the device kernels so that every
backend draws the same tokens from the same logits and seeds. For row seed ``s`` and token
``j``, with unsigned 64-bit wrapping arithmetic::

    x = s * 0x9E3779B97F4A7C15 + j
    z = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)                                   # splitmix64's finaliser
    u = ((z >> 11) + 0.5) * 2 ** -53                    # in (0, 1)

Among the allowed tokens, the drawn one maximises ``p_j / -log(u_j)`` (an exponential race,
which draws token ``j`` with probability ``p_j``), ties to the lowest index. The allowed tokens
are the ``top_k`` most likely of ``softmax(logits / temperature)`` (0: all), then, of the
distribution renormalised over those, the smallest set of most likely tokens whose probability
reaches ``top_p`` (at least one). Ties in probability rank the lower index first.

A logit of ``-inf`` masks its token. A row with no finite logit, or with a NaN or ``+inf``,
draws some token id of the row's range, which one is not specified.
"""

from __future__ import annotations

import torch

from sagellm_backend.torch_backend.arguments import fail, same_device, tensor_arg

__all__ = ["GOLDEN", "MIX_1", "MIX_2", "sample", "uniform_noise"]

GOLDEN = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """The int64 with the bits of the unsigned 64-bit ``value``."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned right shift of int64 bits (torch shifts arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """float64 ``[b, vocab]``: ``u`` of every (row seed, token index), in (0, 1)."""
    tokens = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    z = seeds.to(torch.int64)[:, None] * _signed(GOLDEN) + tokens[None, :]
    z = (z ^ _shift(z, 30)) * _signed(MIX_1)
    z = (z ^ _shift(z, 27)) * _signed(MIX_2)
    z = z ^ _shift(z, 31)
    return (_shift(z, 11).to(torch.float64) + 0.5) * 2.0**-53


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    """One token id per row of ``logits[b, vocab]``, int64 ``[b]``; greedy where the
    temperature is 0."""
    op = "sample"
    scores = tensor_arg(op, "logits", logits, "[b, vocab]")
    batch, vocab = scores.shape
    temp = tensor_arg(op, "temperature", temperature, "[b]", leading=batch)
    k = tensor_arg(op, "top_k", top_k, "[b]", index=True, leading=batch)
    p = tensor_arg(op, "top_p", top_p, "[b]", leading=batch)
    rows = tensor_arg(op, "seeds", seeds, "[b]", index=True, leading=batch)
    same_device(op, scores, temperature=temp, top_k=k, top_p=p, seeds=rows)
    if vocab == 0:
        fail(op, "logits has no tokens (vocab 0)", "pass logits[b, vocab] with vocab >= 1")
    greedy = temp == 0
    filtered = ~greedy & (((k > 0) & (k < vocab)) | (p < 1))
    bad_temp, bad_k, bad_p, all_greedy, any_filtered = torch.stack(
        [
            ((temp < 0) | ~torch.isfinite(temp)).any(),
            (k < 0).any(),
            ~((p > 0) & (p <= 1)).all(),
            greedy.all(),
            filtered.any(),
        ]
    ).tolist()
    for bad, what, hint in (
        (bad_temp, "temperature must be finite and >= 0 (0: greedy)", "clamp the temperatures"),
        (bad_k, "top_k must be >= 0 (0: no top-k)", "pass top_k 0 to keep every token"),
        (bad_p, "top_p must be in (0, 1] (1: no top-p)", "pass top_p 1 to keep every token"),
    ):
        if bad:
            fail(op, what, hint)
    best = scores.argmax(dim=-1)
    if all_greedy:
        return best
    wide = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    heat = torch.where(greedy, torch.ones_like(temp), temp).to(wide.dtype)
    peak = wide.amax(dim=-1, keepdim=True)  # scaled after: no overflow at small temperatures
    probs = torch.softmax((wide - peak) / heat[:, None], dim=-1)
    race = probs.to(torch.float64) / -torch.log(uniform_noise(rows, vocab))
    if any_filtered:
        race = torch.where(_allowed(probs, k, p), race, -1.0)
    return torch.where(greedy, best, race.argmax(dim=-1))


def _allowed(probs: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """bool ``[b, vocab]``: the tokens top-k and then top-p keep of each row."""
    vocab = probs.shape[1]
    ranked, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=probs.device)
    limit = torch.where((k == 0) | (k > vocab), vocab, k.to(torch.int64))
    keep = rank[None, :] < limit[:, None]
    kept = ranked * keep
    before = (kept.cumsum(dim=-1) - kept) / kept.sum(dim=-1, keepdim=True)
    keep &= before < p[:, None].to(probs.dtype)
    return torch.zeros_like(keep).scatter_(1, order, keep)
