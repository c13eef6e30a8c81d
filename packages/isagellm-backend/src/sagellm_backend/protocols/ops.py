"""Typed signatures of the standard kernel ops, and the typed lookup that returns them.

Every op is queued on the current stream, like any device work, and reads and writes only the
tensors it is given. Shapes use ``n`` new tokens, ``b`` sequences, ``d`` head size; a KV cache
argument is one layer's cache as ``kv_cache(layer)`` returns it. Which ops a backend offers is
in ``capability().supported_ops`` (the catalogue: :mod:`sagellm_backend.ops`).
"""

from __future__ import annotations

from typing import Literal, Protocol, TypeVar, overload, runtime_checkable

from sagellm_backend.dtypes import DType

__all__ = [
    "FusedAddRmsNorm",
    "KVCacheWrite",
    "OpLookup",
    "PagedAttentionDecode",
    "PagedAttentionPrefill",
    "RmsNorm",
    "RotaryCosSinCache",
    "RotaryEmbedding",
    "Sample",
    "SiluAndMul",
]

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)
T_co = TypeVar("T_co", covariant=True)


class KVCacheWrite(Protocol[T_contra]):
    def __call__(
        self, key: T_contra, value: T_contra, kv_cache: T_contra, slot_mapping: T_contra
    ) -> None:
        """Write ``key[i]`` and ``value[i]`` (``[n, kv_heads, d]``) into slot ``slot_mapping[i]``.

        A slot of -1 is skipped (padding). Shapes and dtypes are checked before anything is
        queued; a slot outside ``[-1, num_pages * tokens_per_block)`` is never written.
        """


class PagedAttentionDecode(Protocol[T]):
    def __call__(
        self,
        query: T,
        kv_cache: T,
        block_tables: T,
        seq_lens: T,
        scale: float,
        *,
        out: T | None = None,
    ) -> T:
        """Attention of ``query[i]`` (``[b, heads, d]``) over the first ``seq_lens[i]`` tokens
        of sequence ``i``, read through row ``i`` of ``block_tables``; GQA and MQA when ``heads``
        is a multiple of the cache's ``kv_heads``. A sequence of length 0 gets zeros.
        Returns ``out`` (written in full) or a new ``[b, heads, d]`` tensor."""
        ...


class PagedAttentionPrefill(Protocol[T]):
    def __call__(
        self,
        query: T,
        kv_cache: T,
        block_tables: T,
        seq_lens: T,
        query_start_loc: T,
        max_query_len: int,
        scale: float,
        *,
        out: T | None = None,
    ) -> T:
        """Causal attention of new tokens over their sequence's cache.

        Sequence ``i``'s new tokens are ``query[query_start_loc[i]:query_start_loc[i + 1]]``,
        the last of its ``seq_lens[i]`` tokens, whose K and V are already in the cache; new
        token ``j`` of ``q`` attends to positions ``0 .. seq_lens[i] - q + j``. Decode (one new
        token), prefill (no cached prefix) and chunked prefill are the same call.
        ``max_query_len`` bounds every ``q``. Returns ``out`` or a new ``[n, heads, d]`` tensor,
        every row of a sequence's new tokens written; rows past ``query_start_loc[-1]`` are
        padding, and what they get is unspecified.
        """
        ...


class RotaryCosSinCache(Protocol[T_co]):
    def __call__(
        self,
        max_position: int,
        rotary_dim: int,
        base: float = 10000.0,
        *,
        dtype: DType | str = DType.FP32,
    ) -> T_co:
        """``[max_position, rotary_dim]`` on the device: the cosines of the angles
        ``position * base ** (-2i / rotary_dim)`` in the first half, their sines in the second."""
        ...


class RotaryEmbedding(Protocol[T]):
    def __call__(
        self, positions: T, query: T, key: T, cos_sin_cache: T, *, is_neox: bool = True
    ) -> tuple[T, T]:
        """Rotate the first ``rotary_dim`` (``cos_sin_cache.shape[-1]``) features of every head
        of ``query[n, heads, d]`` and ``key[n, kv_heads, d]`` in place by the angles of
        ``positions[n]``: NeoX style rotates the two halves of those features together, the
        interleaved style rotates pairs ``(2i, 2i + 1)``. Returns ``(query, key)``."""
        ...


class RmsNorm(Protocol[T]):
    def __call__(self, x: T, weight: T, eps: float = 1e-6) -> T:
        """``x / sqrt(mean(x ** 2) + eps) * weight`` over the last dimension, a new tensor."""
        ...


class FusedAddRmsNorm(Protocol[T]):
    def __call__(self, x: T, residual: T, weight: T, eps: float = 1e-6) -> tuple[T, T]:
        """``residual += x`` then ``x = rms_norm(residual, weight, eps)``, both in place.

        Returns ``(x, residual)``."""
        ...


class SiluAndMul(Protocol[T]):
    def __call__(self, x: T) -> T:
        """``silu(x[..., :d]) * x[..., d:]`` for ``x[..., 2 * d]``, a new tensor."""
        ...


class Sample(Protocol[T]):
    def __call__(self, logits: T, temperature: T, top_k: T, top_p: T, seeds: T) -> T:
        """One token id per row of ``logits[b, vocab]``, int64 ``[b]``.

        Row ``i`` is greedy (argmax, lowest index on ties) where ``temperature[i]`` is 0; else
        it samples from ``softmax(logits[i] / temperature[i])`` restricted to the ``top_k[i]``
        most likely tokens (0: all) and then to the smallest set whose probability reaches
        ``top_p[i]`` (1: all). The draw is a fixed function of ``seeds[i]`` (int64): the same
        seeds and logits give the same tokens.
        """
        ...


@runtime_checkable
class OpLookup(Protocol[T]):
    """Typed lookup of the standard ops: ``get_op`` raises on a miss, ``find_op`` returns None.

    A name that is not standard is InvalidArgumentError in both; a standard op the backend does
    not claim is CapabilityError from ``get_op`` and None from ``find_op``.
    """

    @overload
    def get_op(self, name: Literal["kv_cache_write"]) -> KVCacheWrite[T]: ...
    @overload
    def get_op(self, name: Literal["paged_attention_decode"]) -> PagedAttentionDecode[T]: ...
    @overload
    def get_op(self, name: Literal["paged_attention_prefill"]) -> PagedAttentionPrefill[T]: ...
    @overload
    def get_op(self, name: Literal["rotary_cos_sin_cache"]) -> RotaryCosSinCache[T]: ...
    @overload
    def get_op(self, name: Literal["rotary_embedding"]) -> RotaryEmbedding[T]: ...
    @overload
    def get_op(self, name: Literal["rms_norm"]) -> RmsNorm[T]: ...
    @overload
    def get_op(self, name: Literal["fused_add_rms_norm"]) -> FusedAddRmsNorm[T]: ...
    @overload
    def get_op(self, name: Literal["silu_and_mul"]) -> SiluAndMul[T]: ...
    @overload
    def get_op(self, name: Literal["sample"]) -> Sample[T]: ...
    @overload
    def find_op(self, name: Literal["kv_cache_write"]) -> KVCacheWrite[T] | None: ...
    @overload
    def find_op(
        self, name: Literal["paged_attention_decode"]
    ) -> PagedAttentionDecode[T] | None: ...
    @overload
    def find_op(
        self, name: Literal["paged_attention_prefill"]
    ) -> PagedAttentionPrefill[T] | None: ...
    @overload
    def find_op(self, name: Literal["rotary_cos_sin_cache"]) -> RotaryCosSinCache[T] | None: ...
    @overload
    def find_op(self, name: Literal["rotary_embedding"]) -> RotaryEmbedding[T] | None: ...
    @overload
    def find_op(self, name: Literal["rms_norm"]) -> RmsNorm[T] | None: ...
    @overload
    def find_op(self, name: Literal["fused_add_rms_norm"]) -> FusedAddRmsNorm[T] | None: ...
    @overload
    def find_op(self, name: Literal["silu_and_mul"]) -> SiluAndMul[T] | None: ...
    @overload
    def find_op(self, name: Literal["sample"]) -> Sample[T] | None: ...
