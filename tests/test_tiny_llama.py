"""examples/tiny_llama.py against transformers' LlamaForCausalLM built here from the same weights.

The example's own reference is not trusted: transformers computes every logit the test compares.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the example needs torch (the torch session runs it)")
transformers = pytest.importorskip(
    "transformers", reason="transformers is a test dependency of the torch session only"
)

from sagellm_backend import STANDARD_OPS, BackendProvider  # noqa: E402

pytestmark = pytest.mark.torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama.py"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tiny_llama", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_llama"] = module
    spec.loader.exec_module(module)
    return module


def hf_model(example: ModuleType, weights: dict[str, Any], dtype: Any) -> Any:
    c = example.SHAPES["tiny"]
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in name for name in missing), (missing, unexpected)
    return model.to(dtype).eval()


def hf_logits(model: Any, prompt: list[int], generated: list[int]) -> Any:
    """transformers' logits of each step that produced ``generated`` (teacher-forced)."""
    ids = torch.tensor([[*prompt, *generated[:-1]]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 :]
    return logits.double()


@pytest.fixture
def counting() -> Callable[[BackendProvider[Any]], Counter[str]]:
    """Wrap every standard kernel of a backend in a call counter (the example is not trusted)."""

    def wrap(backend: BackendProvider[Any]) -> Counter[str]:
        calls: Counter[str] = Counter()
        for name in STANDARD_OPS:
            if STANDARD_OPS[name].kind is None:
                continue
            spec = backend.kernel_spec(name)

            def counted(*args: Any, _name: str = name, _impl: Any = spec.impl, **kw: Any) -> Any:
                calls[_name] += 1
                return _impl(*args, **kw)

            backend.register_kernel(
                name,
                counted,
                kind=spec.kind,
                dtypes=spec.dtypes,
                reference=spec.reference,
                make_inputs=spec.make_inputs,
                compare=spec.compare,
                override=True,
            )
        return calls

    return wrap


def setup(example: ModuleType, dtype: str) -> tuple[Any, Any, Any]:
    config = example.SHAPES["tiny"]
    lengths = [5, 23, 41, 60]
    weights = example.build_weights(config, seed=3)
    prompts = example.build_prompts(config, lengths, seed=4)
    backend = example.open_backend("cpu", config, dtype, sum(lengths) + 4 * NEW_TOKENS)
    return backend, weights, prompts


def test_fp32_tokens_and_logits_match_transformers(
    example: ModuleType, counting: Callable[[BackendProvider[Any]], Counter[str]]
) -> None:
    backend, weights, prompts = setup(example, "fp32")
    try:
        calls = counting(backend)
        result = example.generate(
            backend, example.SHAPES["tiny"], weights, prompts, NEW_TOKENS, torch.float32
        )
    finally:
        backend.close()
    model = hf_model(example, weights, torch.float32)
    worst = 0.0
    for i, prompt in enumerate(prompts):
        ref = hf_logits(model, prompt, result.tokens[i])
        ours = torch.stack([step[i] for step in result.step_logits]).double()
        assert ref.argmax(-1).tolist() == result.tokens[i], f"sequence {i} diverged"
        worst = max(worst, float((ours - ref).abs().max()))
    assert worst <= 1e-4
    kernels = {name for name, op in STANDARD_OPS.items() if op.kind is not None}
    assert set(calls) == kernels, f"not called: {sorted(kernels - set(calls))}"
    assert all(len(t) == NEW_TOKENS for t in result.tokens)


def test_bf16_argmax_agrees_teacher_forced(example: ModuleType) -> None:
    config = example.SHAPES["tiny"]
    lengths = [5, 23, 41, 60]
    weights = example.build_weights(config, seed=5)
    prompts = example.build_prompts(config, lengths, seed=6)
    model = hf_model(example, weights, torch.float32)
    reference: list[list[int]] = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                min_new_tokens=NEW_TOKENS,
            )
        reference.append(out[0, len(prompt) :].tolist())
    backend = example.open_backend("cpu", config, "bf16", sum(lengths) + 4 * NEW_TOKENS)
    try:
        result = example.generate(
            backend, config, weights, prompts, NEW_TOKENS, torch.bfloat16, forced=reference
        )
    finally:
        backend.close()
    steps = [
        int(step[i].argmax()) == reference[i][t]
        for t, step in enumerate(result.step_logits)
        for i in range(len(prompts))
    ]
    assert sum(steps) / len(steps) >= 0.95


def test_command_line_json(example: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert example.main(["--spec", "cpu", "--new-tokens", "4", "--batch", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens_identical"] is True
    assert report["max_logit_diff"] <= 1e-4
    for key in ("tokens", "reference_tokens", "ops_called", "prefill_ms", "decode_step_ms"):
        assert key in report
