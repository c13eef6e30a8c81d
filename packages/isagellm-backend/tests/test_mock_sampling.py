"""The mock's ``sample`` op against a computation written here from the noise spec: splitmix64
noise checked against published splitmix64 outputs, the draw as a Gumbel-max in log space,
and the draws' frequencies against the filtered softmax they sample from."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest

from sagellm_backend import CapabilityError, DType, InvalidArgumentError
from sagellm_backend.mock import MockBackendProvider, MockTensor
from sagellm_backend.mock.sampling import draw, uniform

# splitmix64 seeded with 0: its first three outputs, the finaliser of 1, 2 and 3 times the
# golden-ratio increment, as published with the generator.
SPLITMIX64_FROM_ZERO = (0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F)


def hand_uniform(seed: int, token: int) -> float:
    state = (seed * 0x9E3779B97F4A7C15 + token) % 2**64
    z = state
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * factor) % 2**64
    z ^= z >> 31
    return ((z >> 11) + 0.5) / 2**53


def hand_draw(row: list[float], temperature: float, top_k: int, top_p: float, seed: int) -> int:
    """Greedy, or Gumbel-max over the filtered softmax, in log space."""
    if temperature == 0:
        return row.index(max(row))
    z = [x / temperature for x in row]
    ranked = sorted(range(len(row)), key=lambda j: (-z[j], j))
    kept = ranked[:top_k] if 0 < top_k < len(row) else ranked
    log_total = math.log(sum(math.exp(z[j] - z[ranked[0]]) for j in kept)) + z[ranked[0]]
    allowed, reached = [], 0.0
    for j in kept:
        allowed.append(j)
        reached += math.exp(z[j] - log_total)
        if reached >= top_p:
            break
    scores = {j: z[j] - log_total - math.log(-math.log(hand_uniform(seed, j))) for j in allowed}
    return max(sorted(allowed), key=scores.__getitem__)


def test_the_noise_is_splitmix64() -> None:
    for k, output in enumerate(SPLITMIX64_FROM_ZERO, start=1):
        assert uniform(k, 0) == ((output >> 11) + 0.5) * 2.0**-53
    rng = random.Random(1)
    for _ in range(200):
        seed, token = rng.randrange(-(2**63), 2**63), rng.randrange(1 << 20)
        assert uniform(seed, token) == hand_uniform(seed, token)
        assert 0.0 < uniform(seed, token) < 1.0


@pytest.mark.parametrize("seed", range(4))
def test_draws_match_the_hand_computation(seed: int) -> None:
    rng = random.Random(seed)
    p = MockBackendProvider()
    sample = p.get_op("sample")
    rows, vocab = 12, rng.randint(2, 40)
    logits = [rng.gauss(0, 2) for _ in range(rows * vocab)]
    temps = [rng.choice([0.0, 0.5, 1.0, 1.7]) for _ in range(rows)]
    ks = [rng.choice([0, 1, 3, vocab, vocab + 5]) for _ in range(rows)]
    ps = [rng.choice([1.0, 0.9, 0.5, 0.01]) for _ in range(rows)]
    seeds = [rng.randrange(-(2**23), 2**23) for _ in range(rows)]
    stored = MockTensor(logits, "fp32")
    out = sample(stored, MockTensor(temps), MockTensor(ks), MockTensor(ps), MockTensor(seeds))
    p.synchronize()
    values = stored.tolist()
    want = [
        hand_draw(values[i * vocab : (i + 1) * vocab], temps[i], ks[i], ps[i], seeds[i])
        for i in range(rows)
    ]
    assert out.tolist() == want
    p.close()


def test_frequencies_follow_the_filtered_softmax() -> None:
    row = [2.0, 1.5, 0.5, 0.0, -1.0]
    weights = [math.exp(x) for x in row]
    for top_k, top_p, allowed in ((0, 1.0, 5), (2, 1.0, 2), (0, 0.8, 3)):
        probs = [w / sum(weights[:allowed]) for w in weights[:allowed]]
        draws = Counter(draw(row, 1.0, top_k, top_p, seed) for seed in range(3000))
        assert set(draws) == set(range(allowed))
        for token, prob in enumerate(probs):
            assert abs(draws[token] / 3000 - prob) < 0.04, (top_k, top_p, token)


def test_greedy_and_single_token_rows_ignore_the_noise() -> None:
    row = [0.5, 3.0, -1.0, 3.0]
    for seed in range(50):
        assert draw(row, 0.0, 0, 1.0, seed) == 1  # ties to the lowest index
        assert draw(row, 0.8, 1, 1.0, seed) == 1
        assert draw(row, 0.8, 0, 1e-9, seed) == 1


def test_the_draw_is_queued_and_bad_inputs_are_refused() -> None:
    p = MockBackendProvider()
    sample = p.get_op("sample")
    ones = MockTensor([1.0, 1.0])
    stream = p.current_stream()
    out = sample(MockTensor([0.0, 4.0, 5.0, 1.0]), MockTensor([0.0, 0.0]), ones, ones, ones)
    assert out.tolist() == [0.0, 0.0]  # not run yet
    stream.synchronize()
    assert out.tolist() == [1.0, 0.0]
    logits = MockTensor([0.0] * 6)
    bad = [
        (logits, MockTensor([-1.0, 1.0]), ones, ones, ones),
        (logits, ones, MockTensor([0.5, 1.0]), ones, ones),
        (logits, ones, ones, MockTensor([0.0, 1.0]), ones),
        (logits, ones, ones, MockTensor([1.5, 1.0]), ones),
        (logits, ones, ones, ones, MockTensor([0.5, 1.0])),
        (logits, ones, ones, ones, MockTensor([1.0])),
        (MockTensor([0.0] * 5), ones, ones, ones, ones),
        ([0.0] * 6, ones, ones, ones, ones),
        (logits, MockTensor([float("inf"), 1.0]), ones, ones, ones),
    ]
    queued = stream.queued
    for args in bad:
        with pytest.raises(InvalidArgumentError) as info:
            sample(*args)
        assert info.value.hint
    assert stream.queued == queued
    p.close()


def test_only_claimed_ops_are_offered() -> None:
    p = MockBackendProvider(supported_ops=["batch_metadata"])
    assert p.find_op("sample") is None and p.find_op("rms_norm") is None
    with pytest.raises(CapabilityError):
        p.get_op("sample")
    with pytest.raises(InvalidArgumentError, match="not a standard kernel op"):
        p.find_op("kv_cache")
    with pytest.raises(CapabilityError):
        p.kv_cache(0)
    with pytest.raises(InvalidArgumentError, match="does not implement"):
        MockBackendProvider(supported_ops=["rms_norm"])
    p.close()


def test_the_registered_spec_checks_sample_and_catches_a_broken_draw() -> None:
    p = MockBackendProvider(supported_dtypes=["fp32", "fp16", "bf16", "fp8"])
    spec = p.kernel_spec("sample")
    for seed in range(4):
        for dtype in ("fp32", "fp16", "bf16", "fp8"):
            spec.check(seed, DType(dtype))

    def no_top_p(*args: MockTensor) -> MockTensor:
        logits, temperature, top_k, top_p, seeds = args
        everything = MockTensor([1.0] * len(top_p))
        tokens: MockTensor = spec.impl(logits, temperature, top_k, everything, seeds)
        return tokens

    broken = dataclasses.replace(spec, impl=no_top_p)
    failures = 0
    for seed in range(8):
        try:
            broken.check(seed, DType.FP32)
        except AssertionError:
            failures += 1
    assert failures > 0
    p.close()
