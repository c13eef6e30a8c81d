"""The mock's ``sample`` op: the standard draw, on MockTensors, in pure Python.

``logits`` is row-major ``[b * vocab]``; ``b`` is the length of ``temperature``. Row ``i`` is
greedy (argmax, lowest index on ties) where ``temperature[i]`` is 0. Otherwise the row's
probabilities are ``softmax(logits / temperature)``, kept to the ``top_k`` most likely tokens
(0: all; ties by lower index) and renormalised, then to the smallest set of most likely tokens
whose probability sum reaches ``top_p`` (1: all; at least one token). The token drawn is the
allowed ``j`` maximising ``p_j / -log(u_j)`` (an exponential race, the same as a Gumbel-max
draw; ties to the lowest index), with ``u_j`` = :func:`uniform` ``(seeds[i], j)``: the noise
every backend's ``sample`` uses, so all of them draw the same tokens from the same inputs. A
logit of ``-inf`` masks its token; a row with no finite logit, or with a NaN or ``+inf``, draws
some token id of the row's range, which one is not specified.

The draw is device work: it is queued on the current stream, and the returned tensor (fp32, as
MockTensor has no int64; token ids below 2**24 are exact) holds the tokens once it has run.

:func:`reference_sample` computes the same draw another way (a Gumbel-max in log space, the
filters written anew), and :class:`SampleInputs` makes fresh inputs: the kernel spec the mock
registers, and the oracle the conformance kit's mock target checks ``sample`` against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from sagellm_backend.dtypes import DType
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.kernels import KernelInputs
from sagellm_backend.mock.streams import StreamScheduler
from sagellm_backend.mock.tensor import MockTensor

__all__ = [
    "SAMPLE_DTYPES",
    "SampleComparison",
    "SampleInputs",
    "draw",
    "reference_sample",
    "sample",
    "uniform",
]

SAMPLE_DTYPES = (DType.FP32, DType.FP16, DType.BF16, DType.FP8)
"""The logits dtypes ``sample`` is checked in."""

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def uniform(seed: int, token: int) -> float:
    """The noise of ``token`` under ``seed``: splitmix64 of ``seed * golden + token`` (mod
    2**64), its top 53 bits mapped into the open interval (0, 1)."""
    z = (seed * _GOLDEN + token) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return ((z >> 11) + 0.5) * 2.0**-53


def draw(row: Sequence[float], temperature: float, top_k: int, top_p: float, seed: int) -> int:
    """The token drawn from one row of logits (see the module docstring)."""
    vocab = len(row)
    if temperature == 0:
        return max(range(vocab), key=row.__getitem__)
    peak = max(row)
    scaled = [(x - peak) / temperature for x in row]  # at most 0: no overflow
    order = sorted(range(vocab), key=lambda j: (-scaled[j], j))
    if 0 < top_k < vocab:
        order = order[:top_k]
    weights = [math.exp(scaled[j]) for j in order]
    total = math.fsum(weights)
    probs = [w / total for w in weights]
    if top_p < 1:
        reached, keep = 0.0, 0
        while keep < len(probs) and (keep == 0 or reached < top_p):
            reached += probs[keep]
            keep += 1
        order, probs = order[:keep], probs[:keep]
    best, best_token = -1.0, -1
    for p, j in zip(probs, order, strict=True):
        score = p / -math.log(uniform(seed, j))
        if score > best or (score == best and j < best_token):
            best, best_token = score, j
    return best_token if best_token >= 0 else order[0]  # no score: a NaN or +inf logit


def sample(
    streams: StreamScheduler,
    logits: MockTensor,
    temperature: MockTensor,
    top_k: MockTensor,
    top_p: MockTensor,
    seeds: MockTensor,
) -> MockTensor:
    """One token per row of ``logits``, drawn on the current stream; see the module docstring."""
    streams.check_open()
    named = {
        "logits": logits,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seeds": seeds,
    }
    for name, tensor in named.items():
        if not isinstance(tensor, MockTensor):
            raise InvalidArgumentError(
                f"{name} must be a MockTensor, got {type(tensor).__name__}",
                hint="build the sampling inputs with MockTensor(values, dtype)",
            )
    rows = len(temperature)
    for name in ("top_k", "top_p", "seeds"):
        if len(named[name]) != rows:
            raise InvalidArgumentError(
                f"{name} has {len(named[name])} entries for {rows} rows (temperature's length)",
                hint="pass one temperature, top_k, top_p and seed per row",
            )
    if rows == 0 or len(logits) == 0 or len(logits) % rows:
        raise InvalidArgumentError(
            f"logits of {len(logits)} values do not split into {rows} non-empty rows",
            hint="pass logits row-major as [rows * vocab], one row per temperature",
        )
    temps, ks, ps, keys = (t.tolist() for t in (temperature, top_k, top_p, seeds))
    _check_params(temps, ks, ps, keys)
    out = MockTensor.zeros(rows, DType.FP32)
    vocab = len(logits) // rows

    def run() -> None:
        values = logits.tolist()
        tokens = [
            draw(values[i * vocab : (i + 1) * vocab], temps[i], int(ks[i]), ps[i], int(keys[i]))
            for i in range(rows)
        ]
        out.assign_(tokens)

    streams.current().launch(run)
    return out


def _check_params(temps: list[float], ks: list[float], ps: list[float], keys: list[float]) -> None:
    for i, (t, k, p, s) in enumerate(zip(temps, ks, ps, keys, strict=True)):
        if not (math.isfinite(t) and t >= 0):
            raise InvalidArgumentError(
                f"temperature[{i}] is {t}; it must be finite and at least 0",
                hint="pass 0 for greedy rows and a positive temperature otherwise",
            )
        if not (float(k).is_integer() and k >= 0):
            raise InvalidArgumentError(
                f"top_k[{i}] is {k}; it must be a whole number of at least 0",
                hint="pass 0 to keep every token",
            )
        if not 0 < p <= 1:
            raise InvalidArgumentError(
                f"top_p[{i}] is {p}; it must be in (0, 1]", hint="pass 1 to keep every token"
            )
        if not float(s).is_integer():
            raise InvalidArgumentError(
                f"seeds[{i}] is {s}; it must be a whole number", hint="pass integer seeds"
            )


def reference_sample(
    logits: MockTensor,
    temperature: MockTensor,
    top_k: MockTensor,
    top_p: MockTensor,
    seeds: MockTensor,
) -> MockTensor:
    """The draw of :func:`sample` computed another way, at once: a Gumbel-max in log space."""
    rows = len(temperature)
    vocab = len(logits) // rows
    values = logits.tolist()
    tokens = []
    for i in range(rows):
        row, t = values[i * vocab : (i + 1) * vocab], temperature.tolist()[i]
        if t == 0:
            tokens.append(row.index(max(row)))
            continue
        z = [x / t for x in row]
        ranked = sorted(range(vocab), key=lambda j: (-z[j], j))
        k = int(top_k.tolist()[i])
        kept = ranked[:k] if 0 < k < vocab else ranked
        log_total = z[ranked[0]] + math.log(math.fsum(math.exp(z[j] - z[ranked[0]]) for j in kept))
        allowed, reached = [], 0.0
        for j in kept:
            allowed.append(j)
            reached += math.exp(z[j] - log_total)
            if reached >= top_p.tolist()[i]:
                break
        seed = int(seeds.tolist()[i])
        gumbel = {j: z[j] - math.log(-math.log(uniform(seed, j))) for j in allowed}
        tokens.append(max(sorted(allowed), key=gumbel.__getitem__))
    return MockTensor(tokens, DType.FP32)


class SampleInputs:
    """Fresh sampling inputs from a seed: rows of every kind (greedy, top-k, top-p, both)."""

    def __call__(self, seed: int, dtype: DType) -> KernelInputs:
        import random  # deferred: only the conformance kit makes sampling inputs

        rng = random.Random(seed)
        rows, vocab = 8, rng.randint(2, 48)
        logits = MockTensor([rng.gauss(0, 3) for _ in range(rows * vocab)], dtype)
        temps = [0.0] + [rng.choice([0.3, 1.0, 2.0]) for _ in range(rows - 1)]
        ks = [rng.choice([0, 1, 5, vocab]) for _ in range(rows)]
        ps = [rng.choice([1.0, 0.95, 0.6]) for _ in range(rows)]
        seeds = [rng.randrange(-(2**23), 2**23) for _ in range(rows)]
        tensors = (temps, ks, ps, seeds)
        return (logits, *(MockTensor(values, DType.FP32) for values in tensors)), {}


class SampleComparison:
    """Compares sampled tokens with the reference's once ``synchronize`` (of the provider that
    drew them) has run its streams' work."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self._synchronize = synchronize

    def __call__(self, result: object, expected: object, dtype: DType) -> None:
        self._synchronize()
        if result != expected:
            raise AssertionError(f"{dtype.value}: sampled {result!r}, reference {expected!r}")
