"""A Llama-architecture model decoded through the backend protocols alone.

Random weights built in code (no downloads). Plain torch computes the linear layers, the
embedding and the residual adds; the KV writes, attention, rotary embedding, norms, sampling
and batch metadata go through the standard ops of a backend obtained from ``get_backend``::

    python examples/tiny_llama.py --spec cpu --dtype fp32 --json
    python examples/tiny_llama.py --spec cuda --dtype bf16 --shape llama-1b --batch 64 \\
        --context 2048 --graph --no-reference --json

Every step: plan the batch's metadata once, then per layer write the new K and V into their
slots, rotate, attend over the pages, norm and feed forward; sample at the end. Prompts are
prefilled in one batched call of ``paged_attention_prefill``; decode grows each sequence's
block a page at a time. The reference is the same model computed densely in plain torch
(float64 on the host), teacher-forced on the generated tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from sagellm_backend import BackendProvider, BatchMetadata, get_backend

__all__ = ["LlamaConfig", "RunResult", "TinyLlama", "build_weights", "main", "reference_logits"]

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LlamaConfig:
    """The model's shape; names follow transformers' ``LlamaConfig``."""

    num_hidden_layers: int = 4
    hidden_size: int = 512
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1024
    vocab_size: int = 1000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096


SHAPES = {
    "tiny": LlamaConfig(),
    "llama-1b": LlamaConfig(
        num_hidden_layers=16,
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=8192,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
}


def build_weights(config: LlamaConfig, seed: int = 0) -> Weights:
    """Random weights, named as transformers' ``LlamaForCausalLM`` names them, in float32."""
    g = torch.Generator().manual_seed(seed)
    h, d = config.hidden_size, config.head_dim

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    w: Weights = {"model.embed_tokens.weight": normal(config.vocab_size, h, std=1.0)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1.0 + normal(h, std=0.1)
        w[p + "self_attn.q_proj.weight"] = normal(config.num_attention_heads * d, h, std=h**-0.5)
        w[p + "self_attn.k_proj.weight"] = normal(config.num_key_value_heads * d, h, std=h**-0.5)
        w[p + "self_attn.v_proj.weight"] = normal(config.num_key_value_heads * d, h, std=h**-0.5)
        w[p + "self_attn.o_proj.weight"] = normal(h, config.num_attention_heads * d, std=h**-0.5)
        w[p + "post_attention_layernorm.weight"] = 1.0 + normal(h, std=0.1)
        ffn = config.intermediate_size
        w[p + "mlp.gate_proj.weight"] = normal(ffn, h, std=h**-0.5)
        w[p + "mlp.up_proj.weight"] = normal(ffn, h, std=h**-0.5)
        w[p + "mlp.down_proj.weight"] = normal(h, ffn, std=ffn**-0.5)
    w["model.norm.weight"] = 1.0 + normal(h, std=0.1)
    if not config.tie_word_embeddings:
        w["lm_head.weight"] = normal(config.vocab_size, h, std=h**-0.5)
    return w


def build_prompts(config: LlamaConfig, lengths: Sequence[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in lengths]


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class TinyLlama:
    """The model on a backend: weights on the backend's device, every data-path op from it."""

    def __init__(
        self,
        backend: BackendProvider[torch.Tensor],
        config: LlamaConfig,
        weights: Weights,
        dtype: torch.dtype,
    ) -> None:
        self.backend = backend
        self.config = config
        self.dtype = dtype
        self.device = backend.kv_cache(0).device
        self.calls: Counter[str] = Counter()

        def put(name: str) -> torch.Tensor:
            return weights[name].to(device=self.device, dtype=dtype)

        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}.self_attn."
            m = f"model.layers.{i}.mlp."
            qkv = torch.cat([weights[p + n + "_proj.weight"] for n in ("q", "k", "v")])
            gate_up = torch.cat([weights[m + "gate_proj.weight"], weights[m + "up_proj.weight"]])
            self.layers.append(
                _Layer(
                    input_norm=put(f"model.layers.{i}.input_layernorm.weight"),
                    qkv=qkv.to(device=self.device, dtype=dtype),
                    o=put(p + "o_proj.weight"),
                    post_norm=put(f"model.layers.{i}.post_attention_layernorm.weight"),
                    gate_up=gate_up.to(device=self.device, dtype=dtype),
                    down=put(m + "down_proj.weight"),
                )
            )
        self.embed = put("model.embed_tokens.weight")
        self.norm = put("model.norm.weight")
        self.lm_head = self.embed if config.tie_word_embeddings else put("lm_head.weight")
        self.kv_caches = [backend.kv_cache(i) for i in range(config.num_hidden_layers)]
        self.scale = config.head_dim**-0.5

        self.kv_cache_write = backend.get_op("kv_cache_write")
        self.prefill_attention = backend.get_op("paged_attention_prefill")
        self.decode_attention = backend.get_op("paged_attention_decode")
        self.rotary = backend.get_op("rotary_embedding")
        self.rms_norm = backend.get_op("rms_norm")
        self.add_rms_norm = backend.get_op("fused_add_rms_norm")
        self.silu_and_mul = backend.get_op("silu_and_mul")
        self.sample_op = backend.get_op("sample")
        cos_sin_cache = backend.get_op("rotary_cos_sin_cache")
        self.cos_sin = cos_sin_cache(
            config.max_position_embeddings, config.head_dim, config.rope_theta, dtype="fp32"
        )
        self.calls["rotary_cos_sin_cache"] += 1

    def forward(
        self, tokens: torch.Tensor, batch: BatchMetadata[torch.Tensor], *, decode: bool
    ) -> torch.Tensor:
        """Logits of each sequence's last new token, ``[num_seqs, vocab]`` in float32."""
        c = self.config
        heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        n = tokens.shape[0]
        x = F.embedding(tokens, self.embed)
        residual = x
        hidden = self.rms_norm(x, self.layers[0].input_norm, c.rms_norm_eps)
        self.calls["rms_norm"] += 1
        for i, layer in enumerate(self.layers):
            if i > 0:
                hidden, residual = self.add_rms_norm(
                    hidden, residual, layer.input_norm, c.rms_norm_eps
                )
                self.calls["fused_add_rms_norm"] += 1
            qkv = hidden @ layer.qkv.t()
            q = qkv[:, : heads * d].reshape(n, heads, d)
            k = qkv[:, heads * d : (heads + kv_heads) * d].reshape(n, kv_heads, d)
            v = qkv[:, (heads + kv_heads) * d :].reshape(n, kv_heads, d)
            self.rotary(batch.positions, q, k, self.cos_sin, is_neox=True)  # views: in place
            self.kv_cache_write(k, v, self.kv_caches[i], batch.slot_mapping)
            if decode:
                attn = self.decode_attention(
                    q, self.kv_caches[i], batch.block_tables, batch.seq_lens, self.scale
                )
            else:
                attn = self.prefill_attention(
                    q,
                    self.kv_caches[i],
                    batch.block_tables,
                    batch.seq_lens,
                    batch.query_start_loc,
                    batch.max_query_len,
                    self.scale,
                )
            self.calls["rotary_embedding"] += 1
            self.calls["kv_cache_write"] += 1
            self.calls["paged_attention_decode" if decode else "paged_attention_prefill"] += 1
            hidden = attn.reshape(n, heads * d) @ layer.o.t()
            hidden, residual = self.add_rms_norm(hidden, residual, layer.post_norm, c.rms_norm_eps)
            hidden = self.silu_and_mul(hidden @ layer.gate_up.t()) @ layer.down.t()
            self.calls["fused_add_rms_norm"] += 1
            self.calls["silu_and_mul"] += 1
        hidden, _ = self.add_rms_norm(hidden, residual, self.norm, c.rms_norm_eps)
        self.calls["fused_add_rms_norm"] += 1
        last = hidden if decode else hidden[batch.last_token_indices]
        return (last @ self.lm_head.t()).float()

    def sample(self, logits: torch.Tensor, params: _SamplingBuffers) -> torch.Tensor:
        self.calls["sample"] += 1
        return self.sample_op(logits, params.temperature, params.top_k, params.top_p, params.seeds)


@dataclass
class _SamplingBuffers:
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor

    @classmethod
    def greedy(cls, batch: int, device: torch.device) -> _SamplingBuffers:
        return cls(
            temperature=torch.zeros(batch, dtype=torch.float32, device=device),
            top_k=torch.zeros(batch, dtype=torch.int32, device=device),
            top_p=torch.ones(batch, dtype=torch.float32, device=device),
            seeds=torch.arange(batch, dtype=torch.int64, device=device),
        )


@dataclass
class RunResult:
    """What one run produced: tokens, the logits of every generated step, timings, op calls.

    ``graph_step_ms`` is a whole replayed step on the host's clock (planning, the replay,
    sampling, waiting for the device); ``graph_replay_ms`` the replay alone, between two events
    on the device.
    """

    tokens: list[list[int]]
    step_logits: list[torch.Tensor] = field(repr=False)
    prefill_ms: float
    decode_step_ms: float
    graph_step_ms: float | None
    graph_replay_ms: float | None
    ops_called: dict[str, int]


def generate(
    backend: BackendProvider[torch.Tensor],
    config: LlamaConfig,
    weights: Weights,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    dtype: torch.dtype,
    *,
    graph: bool = False,
    forced: Sequence[Sequence[int]] | None = None,
) -> RunResult:
    """Prefill ``prompts`` in one batch, then decode ``new_tokens`` greedily per sequence.

    With ``forced``, step ``t`` feeds ``forced[i][t]`` instead of the sampled token (teacher
    forcing); the sampled tokens are still returned. With ``graph``, the decode step is
    captured once and replayed (the backend must claim ``has_graph_exec``).
    """
    model = TinyLlama(backend, config, weights, dtype)
    device = model.device
    lengths = [len(p) for p in prompts]
    num_seqs = len(prompts)
    layout = backend.kv_layout
    final = [n + new_tokens for n in lengths]
    batch = backend.create_batch_metadata(
        max_seqs=num_seqs,
        max_tokens=sum(lengths),
        max_pages_per_seq=layout.pages_for(max(final)),
    )
    blocks = backend.kv_blocks_alloc(lengths, layout.dtype or "fp16")
    capacity = [backend.kv_block_info(b).num_pages * layout.tokens_per_block for b in blocks]
    sampling = _SamplingBuffers.greedy(num_seqs, device)
    try:
        sync = backend.synchronize
        start = time.perf_counter()
        batch.plan(blocks, lengths, lengths)
        flat = torch.tensor([t for p in prompts for t in p], dtype=torch.int64).to(device)
        logits = model.forward(flat, batch, decode=False)
        sampled = model.sample(logits, sampling)
        sync()
        prefill_ms = (time.perf_counter() - start) * 1e3
        step_logits = [logits.detach().cpu()]
        out = [[int(t)] for t in sampled.tolist()]

        seq_lens = list(lengths)
        tokens_in = torch.empty(num_seqs, dtype=torch.int64, device=device)
        logits_out = torch.empty_like(logits)

        def decode_step() -> None:
            logits_out.copy_(model.forward(tokens_in, batch, decode=True))

        side = backend.create_stream() if graph else None
        began, ended = backend.create_event(), backend.create_event()
        captured = None
        step_ms: list[float] = []
        graph_ms: list[float] = []
        replay_ms: list[float] = []
        for t in range(1, new_tokens):
            feed = [f[t - 1] for f in forced] if forced is not None else [o[-1] for o in out]
            seq_lens = [n + 1 for n in seq_lens]
            grown = [(i, n) for i, n in enumerate(seq_lens) if n > capacity[i]]
            if grown:
                # Grown in place: each block keeps its handle, its new pages appended.
                backend.kv_blocks_grow([blocks[i] for i, _ in grown], [n for _, n in grown])
                for i, _ in grown:
                    pages = backend.kv_block_info(blocks[i]).num_pages
                    capacity[i] = pages * layout.tokens_per_block
            start = time.perf_counter()
            batch.plan(blocks, seq_lens)
            tokens_in.copy_(torch.tensor(feed, dtype=torch.int64), non_blocking=True)
            if side is None:
                decode_step()
            else:
                if captured is None:
                    decode_step()  # warm up outside the capture (compilation, first allocations)
                    sync()
                    with backend.capture_graph(side) as captured:
                        decode_step()
                    start = time.perf_counter()
                # The graph replays on the stream it was captured on: order it after this
                # step's planned metadata and input tokens, and the sampling after it.
                side.wait_stream(backend.current_stream())
                began.record(side)
                captured.replay()
                ended.record(side)
                backend.current_stream().wait_stream(side)
            sampled = model.sample(logits_out, sampling)
            sync()
            (graph_ms if captured is not None else step_ms).append(
                (time.perf_counter() - start) * 1e3
            )
            if captured is not None:
                replay_ms.append(ended.elapsed_ms(began))
            step_logits.append(logits_out.detach().to("cpu", copy=True))
            for row, token in zip(out, sampled.tolist(), strict=True):
                row.append(int(token))
    finally:
        backend.kv_blocks_free(blocks)
    return RunResult(
        tokens=out,
        step_logits=step_logits,
        prefill_ms=prefill_ms,
        decode_step_ms=statistics.median(step_ms) if step_ms else math.nan,
        graph_step_ms=statistics.median(graph_ms) if graph_ms else None,
        graph_replay_ms=statistics.median(replay_ms) if replay_ms else None,
        ops_called=dict(sorted(model.calls.items())),
    )


def reference_logits(
    config: LlamaConfig, weights: Weights, prompt: Sequence[int], generated: Sequence[int]
) -> torch.Tensor:
    """Logits of the steps that produced ``generated`` after ``prompt``: ``[len(generated),
    vocab]``, the model computed densely in float64 (causal attention over the whole sequence)."""
    c = config
    w = {k: v.double() for k, v in weights.items()}
    ids = torch.tensor([*prompt, *generated[:-1]], dtype=torch.int64)
    n = ids.shape[0]
    heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * weight

    inv_freq = c.rope_theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rope(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    x = w["model.embed_tokens.weight"][ids]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].t()).view(n, heads, d))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].t()).view(n, kv_heads, d))
        v = (h @ w[p + "self_attn.v_proj.weight"].t()).view(n, kv_heads, d)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * d**-0.5
        probs = scores.masked_fill(~mask, -math.inf).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * d)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].t()
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].t()
        up = h @ w[p + "mlp.up_proj.weight"].t()
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].t()
    x = norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"]
    return (x @ head.t())[len(prompt) - 1 :]


def step_bytes(config: LlamaConfig, dtype: str, seq_lens: Sequence[int]) -> int:
    """Bytes a decode step must read at least: every layer's weights, the output projection
    once, one embedding row per sequence, and the K and V of every cached token."""
    c = config
    size = DTYPES[dtype].itemsize
    h, d = c.hidden_size, c.head_dim
    attention = (c.num_attention_heads * 2 + c.num_key_value_heads * 2) * d * h
    layer = attention + 3 * c.intermediate_size * h + 2 * h
    kv = sum(seq_lens) * c.num_hidden_layers * 2 * c.num_key_value_heads * d
    rows = len(seq_lens) * h
    return (c.num_hidden_layers * layer + c.vocab_size * h + h + rows + kv) * size


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def open_backend(
    spec: str, config: LlamaConfig, dtype: str, tokens: int, tokens_per_block: int = 16
) -> BackendProvider[torch.Tensor]:
    """A backend whose KV pool has this model's layout and room for ``tokens`` tokens."""
    pages = math.ceil(tokens / tokens_per_block) * 2 + 64
    backend: BackendProvider[torch.Tensor] = get_backend(
        spec,
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_size=config.head_dim,
        tokens_per_block=tokens_per_block,
        kv_dtype=dtype,
        num_blocks=pages,
        host_num_blocks=1,
    )
    return backend


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="cpu", help="backend config string (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=4, help="sequences (default: 4)")
    parser.add_argument(
        "--context", type=int, default=0, help="prompt length of every sequence (default: 5-60)"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--graph", action="store_true", help="capture the decode step once")
    parser.add_argument("--no-reference", action="store_true", help="skip the float64 reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    config = SHAPES[args.shape]
    g = torch.Generator().manual_seed(args.seed + 7)
    if args.context:
        lengths = [args.context] * args.batch
    else:
        lengths = torch.randint(5, 61, (args.batch,), generator=g).tolist()
    weights = build_weights(config, args.seed)
    prompts = build_prompts(config, lengths, args.seed + 1)
    backend = open_backend(
        args.spec, config, args.dtype, sum(lengths) + args.batch * args.new_tokens
    )
    try:
        result = generate(
            backend, config, weights, prompts, args.new_tokens, DTYPES[args.dtype], graph=args.graph
        )
    finally:
        backend.close()
    report: dict[str, object] = {
        "spec": args.spec,
        "backend": backend.device,
        "dtype": args.dtype,
        "shape": args.shape,
        "prompt_lengths": lengths,
        "tokens": result.tokens,
        "prefill_ms": round(result.prefill_ms, 3),
        "decode_step_ms": round(result.decode_step_ms, 3),
        "graph_step_ms": None if result.graph_step_ms is None else round(result.graph_step_ms, 3),
        "graph_replay_ms": result.graph_replay_ms,
        "ops_called": result.ops_called,
        "step_bytes": step_bytes(config, args.dtype, [n + args.new_tokens - 1 for n in lengths]),
        "config": asdict(config),
    }
    if not args.no_reference:
        ref_tokens, diffs = [], []
        for i, prompt in enumerate(prompts):
            ref = reference_logits(config, weights, prompt, result.tokens[i])
            ours = torch.stack([step[i] for step in result.step_logits]).double()
            ref_tokens.append(ref.argmax(-1).tolist())
            diffs.append(float((ours - ref).abs().max()))
        report["reference_tokens"] = ref_tokens
        report["tokens_identical"] = ref_tokens == result.tokens
        report["max_logit_diff"] = max(diffs)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            if key not in ("tokens", "reference_tokens", "config"):
                print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
